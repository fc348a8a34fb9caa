// Searches the index the site build wrote (search-index.js): every page's
// title and text. Runs in the browser, offline and from file:// alike.
(function () {
  "use strict";
  var index = window.PERCH_INDEX || [];
  var script = document.querySelector('script[src$="search-index.js"]');
  // The site's root, from where the index was loaded (pages link relatively).
  var root = script ? script.src.replace(/search-index\.js.*$/, "") : "/";
  var input = document.getElementById("q");
  var results = document.getElementById("results");
  var summary = document.getElementById("summary");

  function href(url) {
    var u = new URL(url.replace(/^\//, ""), root).href;
    // A directory is a listing from file://, its page from a server.
    return location.protocol === "file:" && u.endsWith("/") ? u + "index.html" : u;
  }

  function escape(s) {
    return s.replace(/[&<>"]/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c];
    });
  }

  function count(hay, word) {
    var n = 0, at = hay.indexOf(word);
    while (at !== -1 && n < 20) { n++; at = hay.indexOf(word, at + word.length); }
    return n;
  }

  function snippet(text, words) {
    var lower = text.toLowerCase();
    var at = lower.indexOf(words[0]);
    var start = Math.max(0, at - 80);
    var piece = escape(text.slice(start, start + 240));
    words.forEach(function (w) {
      var re = new RegExp("(" + w.replace(/[.*+?^${}()|[\]\\]/g, "\\$&") + ")", "gi");
      piece = piece.replace(re, "<mark>$1</mark>");
    });
    return (start > 0 ? "…" : "") + piece + "…";
  }

  function search(q) {
    var words = q.toLowerCase().split(/\s+/).filter(Boolean);
    if (!words.length) return [];
    var found = [];
    index.forEach(function (p) {
      var title = p.title.toLowerCase(), text = p.text.toLowerCase();
      var score = 0;
      for (var i = 0; i < words.length; i++) {
        var inTitle = title.indexOf(words[i]) !== -1, n = count(text, words[i]);
        if (!inTitle && !n) return;
        score += (inTitle ? 20 : 0) + n;
      }
      found.push({ page: p, score: score });
    });
    found.sort(function (a, b) { return b.score - a.score; });
    return found.map(function (f) { return f.page; }).map(function (p) {
      return { page: p, words: words };
    });
  }

  function show(q) {
    var hits = search(q);
    results.innerHTML = hits.map(function (h) {
      var p = h.page;
      return '<li><a class="result" href="' + escape(href(p.url)) + '">' + escape(p.title) + "</a>" +
        (p.section && p.section !== p.title ? ' <span class="where">' + escape(p.section) + "</span>" : "") +
        "<p>" + snippet(p.text, h.words) + "</p></li>";
    }).join("");
    summary.textContent = !q.trim() ? "" :
      hits.length ? hits.length + (hits.length === 1 ? " page" : " pages") + " for “" + q + "”" :
      "No page mentions “" + q + "”.";
  }

  var q = new URLSearchParams(location.search).get("q") || "";
  input.value = q;
  show(q);
  input.addEventListener("input", function () {
    show(input.value);
    var url = new URL(location.href);
    url.searchParams.set("q", input.value);
    history.replaceState(null, "", url);
  });
})();
