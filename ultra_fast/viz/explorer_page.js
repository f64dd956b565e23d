// ULTra explorer: every patch token's map, layer by layer, and the token clustering recut at any ζ.
// The arithmetic mirrors ultra_fast/viz/explorer.py (fcluster_ids, page_labels, segment_map_q) so
// that the page and Python agree bit for bit; keep them in step.
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("ultra-data").textContent);
  const [h, w] = D.grid, [ph, pw] = D.patch, n = h * w, H = h * ph, W = w * pw;
  const L = D.layers.length;

  function bytes(b64) {
    const s = atob(b64), out = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  }
  const maps = D.maps.map(bytes);                                  // per layer: n * n uint8 levels
  const lo = D.lo.map((b) => new Float32Array(bytes(b).buffer));   // raw range of each map
  const hi = D.hi.map((b) => new Float32Array(bytes(b).buffer));
  const links = D.linkage.map((b) => new Float64Array(bytes(b).buffer));
  const lut = bytes(D.lut), pal = bytes(D.palette);

  // ---- elements -------------------------------------------------------------------------------
  const $ = (id) => document.getElementById(id);
  const scale = D.display / Math.max(H, W);
  const dw = Math.round(W * scale), dh = Math.round(H * scale);
  for (const id of ["img", "seg-img"]) { $(id).src = D.image; $(id).style.width = dw + "px"; $(id).style.height = dh + "px"; }
  function sizeCanvas(c, cw, ch) { c.width = cw; c.height = ch; c.style.width = dw + "px"; c.style.height = dh + "px"; }
  const overlay = $("overlay"), marks = $("marks"), seg = $("seg"), segMarks = $("seg-marks"), tokens = $("tokens");
  sizeCanvas(overlay, w, h); sizeCanvas(marks, dw, dh); sizeCanvas(seg, W, H); sizeCanvas(segMarks, dw, dh);
  tokens.width = w; tokens.height = h;
  tokens.style.width = Math.round(w * 240 / Math.max(h, w)) + "px"; tokens.style.height = Math.round(h * 240 / Math.max(h, w)) + "px";
  seg.style.opacity = "0.6";
  // CPU-backed canvases: they are small, and read back (getImageData) by the page's API and tests
  const ctx2d = (c) => c.getContext("2d", { willReadFrequently: true });

  const st = { layer: D.layer, r: h >> 1, c: w >> 1, pinned: false, segment: -1, zeta: D.threshold,
               ids: null, K: 0, labels: null, opacity: D.opacity };

  // ---- the dendrogram cut: scipy's fcluster(Z, t, "distance"), numbering included -------------------
  function fcluster(Z, t) {
    const out = new Int32Array(n);
    if (n === 1) return out;
    const md = new Float64Array(n - 1);   // the largest merge height inside each node
    for (let i = 0; i < n - 1; i++) {
      const a = Z[4 * i], b = Z[4 * i + 1];
      let m = Z[4 * i + 2];
      if (a >= n && md[a - n] > m) m = md[a - n];
      if (b >= n && md[b - n] > m) m = md[b - n];
      md[i] = m;
    }
    const visited = new Uint8Array(2 * n - 1), stack = [2 * n - 2];
    let leader = -1, k = 0;
    while (stack.length) {
      const root = stack[stack.length - 1] - n, lc = Z[4 * root], rc = Z[4 * root + 1];
      if (leader === -1 && md[root] <= t) { leader = root; k++; }
      if (lc >= n && !visited[lc]) { visited[lc] = 1; stack.push(lc); continue; }
      if (rc >= n && !visited[rc]) { visited[rc] = 1; stack.push(rc); continue; }
      for (const leaf of [lc, rc]) {
        if (leaf < n) { if (leader === -1) k++; out[leaf] = k; }
      }
      if (leader === root) leader = -1;
      stack.pop();
    }
    for (let i = 0; i < n; i++) out[i] -= 1;
    return out;
  }

  // ---- bilinear upsampling (align_corners=False, edges clamped) --------------------------------------
  function axis(out, inp) {
    const i0 = new Int32Array(out), i1 = new Int32Array(out), l = new Float64Array(out), r = new Float64Array(out);
    const s = inp / out;
    for (let o = 0; o < out; o++) {
      let src = (o + 0.5) * s - 0.5;
      if (src < 0) src = 0;
      const f = Math.floor(src);
      i0[o] = f; i1[o] = f < inp - 1 ? f + 1 : f; l[o] = src - f; r[o] = 1.0 - l[o];
    }
    return { i0, i1, l, r };
  }
  const AY = axis(H, h), AX = axis(W, w);

  // ---- the segmentation at the current layer and ζ ------------------------------------------------
  function recut() {
    const q = maps[st.layer];
    st.ids = fcluster(links[st.layer], st.zeta);
    let K = 0;
    for (let i = 0; i < n; i++) if (st.ids[i] + 1 > K) K = st.ids[i] + 1;
    st.K = K;
    const sums = new Float64Array(K * n);   // integer sums of quantised levels: exact in float64
    for (let t = 0; t < n; t++) {
      const base = st.ids[t] * n, off = t * n;
      for (let j = 0; j < n; j++) sums[base + j] += q[off + j];
    }
    const plane = new Float64Array(H * W), best = new Float64Array(H * W), lab = new Int32Array(H * W);
    for (let k = 0; k < K; k++) {
      const v = sums.subarray(k * n, (k + 1) * n);
      let mn = Infinity, mx = -Infinity;
      for (let y = 0; y < H; y++) {
        const r0 = AY.i0[y] * w, r1 = AY.i1[y] * w, hy = AY.r[y], ly = AY.l[y];
        for (let x = 0; x < W; x++) {
          const x0 = AX.i0[x], x1 = AX.i1[x], hx = AX.r[x], lx = AX.l[x];
          const val = hy * (hx * v[r0 + x0] + lx * v[r0 + x1]) + ly * (hx * v[r1 + x0] + lx * v[r1 + x1]);
          plane[y * W + x] = val;
          if (val < mn) mn = val;
          if (val > mx) mx = val;
        }
      }
      const span = mx - mn;
      for (let p = 0; p < H * W; p++) {
        const s = mx > mn ? (plane[p] - mn) / span : 0;
        if (k === 0 || s > best[p]) { best[p] = s; lab[p] = k; }
      }
    }
    st.labels = lab;
    if (st.segment >= K) st.segment = -1;
    drawSegments();
  }

  function drawSegments() {
    const ctx = ctx2d(seg), im = ctx.createImageData(W, H);
    for (let p = 0; p < H * W; p++) {
      const k = st.labels[p] % 256;
      im.data[4 * p] = pal[3 * k]; im.data[4 * p + 1] = pal[3 * k + 1]; im.data[4 * p + 2] = pal[3 * k + 2]; im.data[4 * p + 3] = 255;
    }
    ctx.putImageData(im, 0, 0);
    const tctx = ctx2d(tokens), tim = tctx.createImageData(w, h);
    for (let t = 0; t < n; t++) {
      const k = st.ids[t] % 256;
      tim.data[4 * t] = pal[3 * k]; tim.data[4 * t + 1] = pal[3 * k + 1]; tim.data[4 * t + 2] = pal[3 * k + 2]; tim.data[4 * t + 3] = 255;
    }
    tctx.putImageData(tim, 0, 0);
    const counts = new Int32Array(st.K);
    for (let t = 0; t < n; t++) counts[st.ids[t]]++;
    const list = $("segments");
    list.textContent = "";
    for (let k = 0; k < st.K; k++) {
      const b = document.createElement("button"), sw = document.createElement("span"), c = k % 256;
      sw.className = "swatch";
      sw.style.background = `rgb(${pal[3 * c]}, ${pal[3 * c + 1]}, ${pal[3 * c + 2]})`;
      b.appendChild(sw);
      b.appendChild(document.createTextNode(`${k}: ${counts[k]} token${counts[k] === 1 ? "" : "s"}`));
      b.dataset.segment = k;
      if (k === st.segment) b.className = "selected";
      b.addEventListener("click", () => selectSegment(k === st.segment ? -1 : k));
      list.appendChild(b);
    }
    $("nseg").textContent = `${st.K} segment${st.K === 1 ? "" : "s"}`;
  }

  // ---- the overlay: one pixel per patch, lut[level] ---------------------------------------------
  function paint(levels) {
    const ctx = ctx2d(overlay), im = ctx.createImageData(w, h);
    for (let j = 0; j < n; j++) {
      const v = levels[j];
      im.data[4 * j] = lut[3 * v]; im.data[4 * j + 1] = lut[3 * v + 1]; im.data[4 * j + 2] = lut[3 * v + 2]; im.data[4 * j + 3] = 255;
    }
    ctx.putImageData(im, 0, 0);
  }

  function segmentLevels(k) {
    const q = maps[st.layer], s = new Float64Array(n);
    for (let t = 0; t < n; t++) if (st.ids[t] === k) for (let j = 0; j < n; j++) s[j] += q[t * n + j];
    let mn = Infinity, mx = -Infinity;
    for (let j = 0; j < n; j++) { if (s[j] < mn) mn = s[j]; if (s[j] > mx) mx = s[j]; }
    const out = new Uint8Array(n);
    for (let j = 0; j < n; j++) out[j] = mx > mn ? Math.floor((s[j] - mn) / (mx - mn) * 255.0 + 0.5) : 255;
    return out;
  }

  function outline(ctx, inside, colour, width) {
    // the border of a set of patches: every patch edge with an outside neighbour
    const sx = dw / w, sy = dh / h;
    ctx.beginPath();
    for (let r = 0; r < h; r++) for (let c = 0; c < w; c++) {
      if (!inside(r, c)) continue;
      const x0 = c * sx, y0 = r * sy, x1 = x0 + sx, y1 = y0 + sy;
      if (r === 0 || !inside(r - 1, c)) { ctx.moveTo(x0, y0); ctx.lineTo(x1, y0); }
      if (r === h - 1 || !inside(r + 1, c)) { ctx.moveTo(x0, y1); ctx.lineTo(x1, y1); }
      if (c === 0 || !inside(r, c - 1)) { ctx.moveTo(x0, y0); ctx.lineTo(x0, y1); }
      if (c === w - 1 || !inside(r, c + 1)) { ctx.moveTo(x1, y0); ctx.lineTo(x1, y1); }
    }
    ctx.strokeStyle = colour; ctx.lineWidth = width; ctx.stroke();
  }

  function fmt(v) { return Math.abs(v) >= 1e4 || (v !== 0 && Math.abs(v) < 1e-3) ? v.toExponential(3) : v.toFixed(4); }

  function draw() {
    const ctx = marks.getContext("2d"), sctx = segMarks.getContext("2d");
    ctx.clearRect(0, 0, dw, dh); sctx.clearRect(0, 0, dw, dh);
    const layer = D.layers[st.layer];
    $("layer-label").textContent = `${layer}` + (L > 1 ? ` (${st.layer + 1} of ${L})` : "");
    if (st.segment >= 0) {
      paint(segmentLevels(st.segment));
      const inside = (r, c) => st.ids[r * w + c] === st.segment;
      for (const c of [ctx, sctx]) { outline(c, inside, "#000", 3); outline(c, inside, "#fff", 1.5); }
      let m = 0;
      for (let t = 0; t < n; t++) if (st.ids[t] === st.segment) m++;
      $("readout").textContent = `segment ${st.segment}: summed map of its ${m} tokens · layer ${layer} · ζ = ${st.zeta}`;
      $("lo").textContent = "min"; $("hi").textContent = "max";
    } else {
      const t = st.r * w + st.c;
      paint(maps[st.layer].subarray(t * n, (t + 1) * n));
      const inside = (r, c) => r === st.r && c === st.c;
      outline(ctx, inside, "#000", 4); outline(ctx, inside, "#fff", 2);
      outline(sctx, inside, "#000", 4); outline(sctx, inside, "#fff", 2);
      $("readout").textContent = `token (${st.r}, ${st.c}) = index ${D.numPrefix + t} · layer ${layer} · ` +
        `segment ${st.ids[t]}` + (st.pinned ? " · pinned" : "");
      $("lo").textContent = fmt(lo[st.layer][t]); $("hi").textContent = fmt(hi[st.layer][t]);
    }
    for (const b of $("segments").children) b.className = Number(b.dataset.segment) === st.segment ? "selected" : "";
  }

  // ---- state changes (also the page's API, window.ultraExplorer) --------------------------------------
  function setToken(r, c, pin) {
    st.r = Math.max(0, Math.min(h - 1, r)); st.c = Math.max(0, Math.min(w - 1, c));
    if (pin !== undefined) st.pinned = pin;
    st.segment = -1;
    draw();
  }
  function setLayer(i) { st.layer = Math.max(0, Math.min(L - 1, i)); $("layer").value = st.layer; recut(); draw(); }
  function setZeta(z) {
    if (!(z > 0)) return;
    st.zeta = z; $("zeta").value = z; $("zeta-num").value = z;
    recut(); draw();
  }
  function selectSegment(k) { st.segment = k; draw(); }
  function setOpacity(a) { st.opacity = a; overlay.style.opacity = a; $("opacity").value = Math.round(a * 100); }

  function cellAt(ev, el) {
    const rect = el.getBoundingClientRect();
    const c = Math.floor((ev.clientX - rect.left) / rect.width * w), r = Math.floor((ev.clientY - rect.top) / rect.height * h);
    return [Math.max(0, Math.min(h - 1, r)), Math.max(0, Math.min(w - 1, c))];
  }

  // ---- events -----------------------------------------------------------------------------------
  const stage = $("stage");
  stage.addEventListener("mousemove", (ev) => {
    const [r, c] = cellAt(ev, stage);
    if (!st.pinned && (r !== st.r || c !== st.c || st.segment >= 0)) setToken(r, c);
    const t = r * w + c;
    const v = st.segment >= 0 ? null : maps[st.layer][(st.r * w + st.c) * n + t];
    $("cursor").textContent = `under the cursor: patch (${r}, ${c})` + (v === null ? "" : `, level ${v} of 255`);
  });
  stage.addEventListener("click", (ev) => {
    const [r, c] = cellAt(ev, stage);
    setToken(r, c, !(st.pinned && r === st.r && c === st.c && st.segment < 0));
    stage.focus();
  });
  $("seg-stage").addEventListener("click", (ev) => {
    const rect = seg.getBoundingClientRect();
    const x = Math.max(0, Math.min(W - 1, Math.floor((ev.clientX - rect.left) / rect.width * W)));
    const y = Math.max(0, Math.min(H - 1, Math.floor((ev.clientY - rect.top) / rect.height * H)));
    const k = st.labels[y * W + x];
    selectSegment(k === st.segment ? -1 : k);
  });
  document.addEventListener("keydown", (ev) => {
    const tag = ev.target && ev.target.tagName;
    if (tag === "INPUT" || tag === "BUTTON" || tag === "TEXTAREA" || tag === "SELECT") return;
    const d = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] }[ev.key];
    if (!d) return;
    ev.preventDefault();
    setToken(st.r + d[0], st.c + d[1], true);
  });
  $("layer").max = L - 1;
  $("layer").addEventListener("input", () => setLayer(Number($("layer").value)));
  $("opacity").addEventListener("input", () => setOpacity(Number($("opacity").value) / 100));
  $("smooth").addEventListener("change", () => overlay.classList.toggle("smooth", $("smooth").checked));
  $("zeta").max = D.zetaMax;
  $("zeta-num").min = 0; $("zeta-num").max = D.zetaMax;
  $("zeta").addEventListener("input", () => setZeta(Number($("zeta").value)));
  $("zeta-num").addEventListener("change", () => setZeta(Number($("zeta-num").value)));

  // the colour bar: the 256 levels
  const cb = $("colourbar").getContext("2d"), cim = cb.createImageData(256, 1);
  for (let v = 0; v < 256; v++) { cim.data[4 * v] = lut[3 * v]; cim.data[4 * v + 1] = lut[3 * v + 1]; cim.data[4 * v + 2] = lut[3 * v + 2]; cim.data[4 * v + 3] = 255; }
  cb.putImageData(cim, 0, 0);

  $("layer").value = st.layer;
  $("zeta").value = st.zeta; $("zeta-num").value = st.zeta;
  setOpacity(st.opacity);
  recut();
  draw();

  window.ultraExplorer = {
    state: st, setToken, setLayer, setZeta, selectSegment, setOpacity,
    labels: () => Array.from(st.labels), ids: () => Array.from(st.ids),
    overlayPixels: () => Array.from(ctx2d(overlay).getImageData(0, 0, w, h).data),
    segmentPixels: () => Array.from(ctx2d(seg).getImageData(0, 0, W, H).data),
    ready: true,
  };
})();
