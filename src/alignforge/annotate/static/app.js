// alignforge annotate: keyboard shortcuts and double-submit protection (no inline scripts: CSP).
(function () {
  "use strict";
  var form = document.getElementById("judge-form");
  var skipForm = document.getElementById("skip-form");
  var submitted = false;

  function guard(f) {
    if (!f) return;
    f.addEventListener("submit", function (ev) {
      if (submitted) { ev.preventDefault(); return; }
      submitted = true;
      var buttons = document.querySelectorAll("button[type=submit]");
      for (var i = 0; i < buttons.length; i++) {
        if (buttons[i].form === f) { buttons[i].setAttribute("aria-busy", "true"); }
      }
    });
  }
  guard(form);
  guard(skipForm);
  if (!form) return;

  function typing(el) {
    if (!el) return false;
    var t = el.tagName;
    return t === "TEXTAREA" || (t === "INPUT" && /^(text|password|search)$/i.test(el.type || "text") && el.type !== "radio") || t === "SELECT";
  }
  function chosen() { return form.querySelector("input[name=overall]:checked"); }
  function send(f) {
    if (submitted) return;
    if (f.requestSubmit) { f.requestSubmit(); } else { f.submit(); }
  }

  document.addEventListener("keydown", function (ev) {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if (typing(ev.target)) {
      if (ev.key === "Enter" && ev.target.tagName === "TEXTAREA" && !ev.shiftKey) {
        ev.preventDefault();
        if (chosen()) send(form);
      }
      return;
    }
    if (/^[1-6]$/.test(ev.key)) {
      var r = form.querySelector("input[name=overall][data-key='" + ev.key + "']");
      if (r) { r.checked = true; r.focus(); ev.preventDefault(); }
    } else if (ev.key === "Enter") {
      ev.preventDefault();
      if (chosen()) { send(form); }
      else { var h = document.getElementById("hint"); if (h) h.textContent = "Choose an overall judgment first (keys 1-6)."; }
    } else if (ev.key === "s" || ev.key === "S") {
      ev.preventDefault();
      if (skipForm) send(skipForm);
    }
  });
})();
