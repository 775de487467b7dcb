"""Untrusted text (prompts, responses) to safe HTML.

Markdown is rendered by markdown-it-py in CommonMark mode with raw HTML disabled and
images disabled (``![x](y)`` stays text), then sanitised with ``nh3`` against an allow-list:
no ``img``, no attributes but ``href``/``title``, links only ``http``/``https``/``mailto``
with ``rel="noopener noreferrer nofollow"``. The page's CSP forbids images and inline
scripts as a second line of defence.
"""

from __future__ import annotations

from functools import lru_cache

import nh3

ALLOWED_TAGS = {
    "p",
    "br",
    "hr",
    "em",
    "strong",
    "code",
    "pre",
    "blockquote",
    "ul",
    "ol",
    "li",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "a",
    "table",
    "thead",
    "tbody",
    "tr",
    "th",
    "td",
    "del",
}
ALLOWED_ATTRIBUTES = {"a": {"href", "title"}, "ol": {"start"}, "th": {"align"}, "td": {"align"}}
URL_SCHEMES = {"http", "https", "mailto"}


@lru_cache(maxsize=1)
def _md():
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})
    md.disable("image")
    md.enable("table")
    return md


def render_markdown(text: str) -> str:
    html = _md().render(text)
    return nh3.clean(
        html,
        tags=ALLOWED_TAGS,
        attributes=ALLOWED_ATTRIBUTES,
        url_schemes=URL_SCHEMES,
        link_rel="noopener noreferrer nofollow",
        strip_comments=True,
    )
