// Latent table: sort, filter and paginate the rows embedded as JSON in #latent-data.
// Plain DOM, no dependencies, no network: works from file://.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("latent-data").textContent);
  var col = {};
  data.columns.forEach(function (c, i) { col[c] = i; });
  var SHOWN = [
    ["variant", "variant"], ["latent", "latent"], ["klass", "class"], ["delta_norm", "Δ<sub>norm</sub>"],
    ["nu_eps", "ν<sup>ε</sup>"], ["nu_r", "ν<sup>r</sup>"], ["f_template", "f<sub>template</sub>"],
    ["freq", "frequency"], ["score", "autointerp"], ["max_act", "max act"], ["rank_nu", "rank ν"],
    ["explanation", "explanation"]
  ];  // labels are constants (markup allowed); data cells are always set as text
  var NUMERIC = ["delta_norm", "nu_eps", "nu_r", "f_template", "freq", "score", "max_act", "rank_nu", "latent"];
  var CLASS_NAMES = {base_only: "base-only", shared: "shared", chat_only: "chat-only", other: "other"};
  var state = {key: "rank_nu", dir: 1, page: 0};
  var $ = function (id) { return document.getElementById(id); };
  var table = $("latent-table"), head = table.tHead.rows[0], body = table.tBodies[0];

  SHOWN.forEach(function (s) {
    var th = document.createElement("th");
    th.innerHTML = s[1];
    th.dataset.key = s[0];
    th.addEventListener("click", function () {
      if (state.key === s[0]) { state.dir = -state.dir; } else { state.key = s[0]; state.dir = 1; }
      state.page = 0;
      draw();
    });
    head.appendChild(th);
  });
  NUMERIC.forEach(function (k) {
    var o = document.createElement("option");
    o.value = k; o.textContent = k;
    $("f-col").appendChild(o);
  });

  function num(id) { var v = $(id).value; return v === "" ? null : Number(v); }

  function filtered() {
    var variant = $("f-variant").value, klass = $("f-class").value, dead = $("f-dead").checked;
    var withPage = $("f-page").checked, text = $("f-text").value.trim().toLowerCase();
    var rc = col[$("f-col").value], lo = num("f-min"), hi = num("f-max");
    return data.rows.filter(function (r) {
      if (variant && r[col.variant] !== variant) return false;
      if (klass && r[col.klass] !== klass) return false;
      if (dead && r[col.dead]) return false;
      if (withPage && !r[col.page]) return false;
      if (lo !== null || hi !== null) {
        var v = r[rc];
        if (v === null || (lo !== null && v < lo) || (hi !== null && v > hi)) return false;
      }
      if (text) {
        var hay = String(r[col.latent]) + " " + (r[col.explanation] || "");
        if (hay.toLowerCase().indexOf(text) < 0) return false;
      }
      return true;
    });
  }

  function compare(a, b) {  // nulls always last, whichever the direction
    var i = col[state.key], x = a[i], y = b[i];
    if (x === null || x === undefined) return (y === null || y === undefined) ? 0 : 1;
    if (y === null || y === undefined) return -1;
    return (x < y ? -1 : x > y ? 1 : 0) * state.dir;
  }

  function cell(r, key) {
    var td = document.createElement("td"), v = r[col[key]];
    if (key === "latent" && r[col.page]) {
      var a = document.createElement("a");
      a.href = r[col.page]; a.textContent = v;
      td.appendChild(a);
    } else if (key === "klass") {
      td.textContent = CLASS_NAMES[v] || v;
    } else if (typeof v === "number") {
      td.className = "num";
      td.textContent = key === "f_template" ? (100 * v).toFixed(1) + "%" : String(Number(v.toPrecision(4)));
    } else {
      td.textContent = v === null || v === undefined ? "–" : v;
      if (key === "explanation") { td.className = "expl"; td.title = v || ""; }
    }
    return td;
  }

  function draw() {
    var rows = filtered().sort(compare);
    var size = Number($("f-size").value), pages = Math.max(1, Math.ceil(rows.length / size));
    state.page = Math.min(state.page, pages - 1);
    var frag = document.createDocumentFragment();
    rows.slice(state.page * size, (state.page + 1) * size).forEach(function (r) {
      var tr = document.createElement("tr");
      SHOWN.forEach(function (s) { tr.appendChild(cell(r, s[0])); });
      frag.appendChild(tr);
    });
    body.replaceChildren(frag);
    Array.prototype.forEach.call(head.cells, function (th) {
      if (th.dataset.key === state.key) th.setAttribute("aria-sort", state.dir > 0 ? "ascending" : "descending");
      else th.removeAttribute("aria-sort");
    });
    $("t-status").textContent = rows.length + " of " + data.rows.length + " latents match";
    $("p-info").textContent = "page " + (state.page + 1) + " of " + pages;
    $("p-prev").disabled = state.page === 0;
    $("p-next").disabled = state.page >= pages - 1;
  }

  ["f-variant", "f-class", "f-dead", "f-page", "f-col", "f-min", "f-max", "f-text", "f-size"].forEach(function (id) {
    $(id).addEventListener(id === "f-text" || id === "f-min" || id === "f-max" ? "input" : "change",
      function () { state.page = 0; draw(); });
  });
  $("p-prev").addEventListener("click", function () { state.page -= 1; draw(); });
  $("p-next").addEventListener("click", function () { state.page += 1; draw(); });
  draw();
})();
