// spillover dashboard: polls GET /status every second and draws it. No dependencies.
// Data only ever reaches the page through textContent and attributes, never as markup.
"use strict";

(() => {
  const REFRESH_MS = 1000;
  const FETCH_TIMEOUT_MS = 5000;
  const KEY_STORE = "spillover.adminKey";
  const BUCKET_S = 10;
  const BUCKETS = 90;
  const SVG_NS = "http://www.w3.org/2000/svg";

  const $ = (id) => document.getElementById(id);

  // --- DOM helpers -------------------------------------------------------------------

  function build(el, attrs, children) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "style") Object.assign(el.style, v);
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : String(c)); // strings become text nodes
    }
    return el;
  }
  const h = (tag, attrs, ...children) => build(document.createElement(tag), attrs, children);
  const svg = (tag, attrs, ...children) =>
    build(document.createElementNS(SVG_NS, tag), attrs, children);

  // --- formatting --------------------------------------------------------------------

  const isNum = (v) => typeof v === "number" && Number.isFinite(v);
  const DASH = "—";

  function int(v) {
    return isNum(v) ? Math.round(v).toLocaleString("en-US") : DASH;
  }
  function pct(v, digits = 0) {
    return isNum(v) ? `${(v * 100).toFixed(digits)}%` : DASH;
  }
  function usd(v) {
    if (!isNum(v)) return DASH;
    if (v === 0) return "$0";
    const a = Math.abs(v);
    const sign = v < 0 ? "−" : "";
    if (a >= 100) return `${sign}$${a.toLocaleString("en-US", { maximumFractionDigits: 0 })}`;
    if (a >= 0.01) return `${sign}$${a.toFixed(2)}`;
    if (a < 1e-9) return `${sign}<$0.000000001`;
    // Hosted calls cost micro-dollars: two significant digits, never an exponent.
    const decimals = Math.min(10, 1 - Math.floor(Math.log10(a)));
    return `${sign}$${a.toFixed(decimals)}`;
  }
  function ms(v) {
    if (!isNum(v)) return DASH;
    return v < 1000 ? `${Math.round(v)} ms` : `${(v / 1000).toFixed(2)} s`;
  }
  function secs(v) {
    if (!isNum(v)) return DASH;
    return v < 10 ? `${v.toFixed(1)} s` : `${Math.round(v)} s`;
  }
  function gib(v) {
    return isNum(v) ? `${(v / 2 ** 30).toFixed(1)} GiB` : DASH;
  }
  function clock(ts) {
    if (!isNum(ts)) return DASH;
    return new Date(ts * 1000).toLocaleTimeString("en-GB", { hour12: false });
  }
  function num(v, digits = 1) {
    return isNum(v) ? v.toFixed(digits) : DASH;
  }

  // --- small widgets -----------------------------------------------------------------

  function badge(text, kind, attrs) {
    return h("span", { class: `badge ${kind}`, ...attrs }, text);
  }

  // A horizontal bar; `parts` are [fraction, class] drawn one after another.
  function bar(parts, attrs) {
    const el = h("div", { class: "bar", ...attrs });
    for (const [fraction, cls] of parts) {
      const f = Math.max(0, Math.min(1, isNum(fraction) ? fraction : 0));
      el.append(h("span", { class: `fill ${cls}`, style: { width: `${(f * 100).toFixed(2)}%` } }));
    }
    return el;
  }

  function facts(pairs) {
    return pairs.flatMap(([label, value, testid]) => [
      h("dt", {}, label),
      h("dd", testid ? { "data-testid": testid } : {}, value),
    ]);
  }

  function empty(text) {
    return h("p", { class: "empty muted" }, text);
  }

  // --- sections ----------------------------------------------------------------------

  function renderHeader(d) {
    const ready = $("ready");
    const notReady = Object.entries(d.aliases || {}).filter(([, a]) => !a.ready).map(([n]) => n);
    ready.textContent = d.ready ? "ready" : "not ready";
    ready.className = `badge ${d.ready ? "ok" : "bad"}`;
    ready.dataset.ready = String(Boolean(d.ready));
    ready.title = d.ready ? "every alias has a usable backend"
      : `no usable backend for: ${notReady.join(", ")}`;
    $("open-warning").hidden = !d.open;
  }

  function renderToday(t) {
    t = t || {};
    $("today-requests").textContent = int(t.requests);
    $("today-local").textContent = int(t.local);
    $("today-hosted").textContent = int(t.hosted);
    $("today-errors").textContent = int(t.errors);
    $("today-share").textContent = pct(t.local_share);
    $("today-hosted-cost").textContent = usd(t.hosted_cost_usd);
    $("today-saving").textContent = usd(t.saving_usd);
  }

  function niceStep(max, ticks) {
    const raw = max / ticks;
    const mag = 10 ** Math.floor(Math.log10(raw));
    for (const m of [1, 2, 5, 10]) if (m * mag >= raw) return Math.max(1, m * mag);
    return Math.max(1, 10 * mag);
  }

  function renderSplit(series, today) {
    const W = 760, H = 230, L = 34, R = 8, T = 10, B = 24;
    const byT = new Map((series || []).map((b) => [Math.round(b.t), b]));
    const latest = Math.max(Date.now() / 1000, ...(series || []).map((b) => b.t));
    const end = latest - (latest % BUCKET_S);
    const start = end - (BUCKETS - 1) * BUCKET_S;
    const buckets = [];
    for (let i = 0; i < BUCKETS; i++) {
      const t = Math.round(start + i * BUCKET_S);
      const b = byT.get(t) || {};
      buckets.push({ t, local: b.local || 0, hosted: b.hosted || 0, errors: b.errors || 0 });
    }
    const peak = Math.max(0, ...buckets.map((b) => b.local + b.hosted + b.errors));
    const step = niceStep(Math.max(peak, 4), 4);
    const top = Math.max(step, Math.ceil(peak / step) * step);
    const plotW = W - L - R, plotH = H - T - B;
    const y = (v) => T + plotH - (v / top) * plotH;
    const bw = plotW / BUCKETS;

    const root = svg("svg", {
      viewBox: `0 0 ${W} ${H}`, class: "split", role: "img", "data-testid": "split-svg",
      "aria-label": `requests per 10 s over the last 15 minutes, local share today ${pct(today && today.local_share)}`,
    });
    const grid = svg("g", { class: "grid" });
    for (let v = 0; v <= top; v += step) {
      grid.append(
        svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v) }),
        svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, String(v)),
      );
    }
    for (let m = 15; m >= 0; m -= 5) {
      const x = L + plotW - (m * 60 / BUCKET_S) * bw + (m === 0 ? 0 : bw / 2);
      grid.append(svg("text", {
        x: Math.min(x, W - R), y: H - 6, "text-anchor": m === 0 ? "end" : m === 15 ? "start" : "middle",
      }, m === 0 ? "now" : `−${m} min`));
    }
    root.append(grid);

    const bars = svg("g", { class: "bars" });
    let drawn = 0;
    buckets.forEach((b, i) => {
      let base = 0;
      const x = L + i * bw + 0.75;
      const tip = `${clock(b.t)}: ${b.local} local, ${b.hosted} hosted, ${b.errors} errors`;
      for (const kind of ["local", "hosted", "errors"]) {
        const n = b[kind];
        if (!n) continue;
        bars.append(svg("rect", {
          x: x.toFixed(2), width: Math.max(1, bw - 1.5).toFixed(2),
          y: y(base + n).toFixed(2), height: (y(base) - y(base + n)).toFixed(2),
          class: kind, "data-testid": "split-bar", "data-route": kind, "data-count": n,
          "data-t": b.t,
        }, svg("title", {}, tip)));
        base += n;
        drawn++;
      }
    });
    root.append(bars);
    if (!drawn) {
      root.append(svg("text", { x: L + plotW / 2, y: T + plotH / 2, class: "chart-empty",
        "text-anchor": "middle" }, "no traffic in the last 15 minutes"));
    }
    $("split-chart").replaceChildren(root);

    const sum = (k) => buckets.reduce((a, b) => a + b[k], 0);
    $("split-legend").replaceChildren(
      h("span", { class: "key local" }, `local ${sum("local")}`),
      h("span", { class: "key hosted" }, `hosted ${sum("hosted")}`),
      h("span", { class: "key errors" }, `errors ${sum("errors")}`),
      h("span", { class: "share" }, "local share today ",
        h("strong", { "data-testid": "split-share" }, pct(today && today.local_share))),
    );
  }

  function budgetLine(title, w, testid) {
    if (!w) return [];
    const head = h("div", { class: "budget-head" }, h("strong", {}, title));
    if (w.limit === null || w.limit === undefined) {
      head.append(h("span", { class: "muted", "data-testid": `${testid}-state` }, "no budget"));
      return [head, h("div", { class: "budget-note muted" }, `spent ${usd(w.spent)}`,
        w.reserved ? `, ${usd(w.reserved)} reserved in flight` : "")];
    }
    const used = w.limit > 0 ? (w.spent + w.reserved) / w.limit : 1;
    const cls = used >= 1 ? "bad" : used >= 0.8 ? "warn" : "ok";
    head.append(h("span", { "data-testid": `${testid}-state`, class: cls },
      `${pct(used)} of ${usd(w.limit)}`));
    return [
      head,
      bar([[w.limit > 0 ? w.spent / w.limit : 1, `spent ${cls}`],
        [w.limit > 0 ? w.reserved / w.limit : 0, "reserved"]], { "data-testid": `${testid}-bar` }),
      h("div", { class: "budget-note muted" }, `spent ${usd(w.spent)}`,
        w.reserved ? ` + ${usd(w.reserved)} reserved` : "", ` · left ${usd(w.left)}`),
    ];
  }

  function renderSpend(budgets, today) {
    const g = (budgets && budgets.global) || {};
    $("budget-daily").replaceChildren(...budgetLine("Today", g.daily, "budget-daily"));
    $("budget-monthly").replaceChildren(...budgetLine("This month", g.monthly, "budget-monthly"));
    today = today || {};
    $("spend-facts").replaceChildren(...facts([
      ["hosted cost today", usd(today.hosted_cost_usd), "spend-hosted-cost"],
      ["total cost today", usd(today.cost_usd), "spend-total-cost"],
      ["saved vs all-hosted", usd(today.saving_usd), "spend-saving"],
    ]));
    const callers = Object.entries((budgets && budgets.callers) || {});
    if (!callers.length) {
      $("caller-budgets").replaceChildren();
      return;
    }
    const cell = (w) => {
      if (!w) return DASH;
      return w.limit === null || w.limit === undefined ? `${usd(w.spent)} / no budget`
        : `${usd(w.spent)} / ${usd(w.limit)}`;
    };
    $("caller-budgets").replaceChildren(h("table", { class: "mini" },
      h("thead", {}, h("tr", {}, h("th", {}, "caller"), h("th", {}, "today"),
        h("th", {}, "this month"))),
      h("tbody", {}, callers.map(([name, c]) => h("tr", { "data-caller": name },
        h("td", {}, name), h("td", {}, cell(c.daily)), h("td", {}, cell(c.monthly)))))));
  }

  function gpuLines(name, gpu) {
    if (!gpu || !gpu.available) {
      return h("div", { class: "gpu muted", title: (gpu && gpu.reason) || "" }, "GPU: no readings");
    }
    const list = (gpu.deployments && gpu.deployments[name]) || [];
    if (!list.length) return h("div", { class: "gpu muted" }, "GPU: none assigned");
    return list.map((g) => {
      const util = isNum(g.utilization_pct) ? g.utilization_pct / 100 : null;
      const mem = isNum(g.memory_used_bytes) && g.memory_total_bytes
        ? g.memory_used_bytes / g.memory_total_bytes : null;
      return h("div", { class: "gpu", "data-testid": "engine-gpu" },
        h("div", { class: "gpu-head" }, h("strong", {}, `GPU ${g.index}`),
          h("span", {}, `${isNum(g.utilization_pct) ? Math.round(g.utilization_pct) : DASH}% util`),
          h("span", {}, `${gib(g.memory_used_bytes)} / ${gib(g.memory_total_bytes)}`),
          h("span", {}, isNum(g.power_watts) ? `${Math.round(g.power_watts)} W` : DASH)),
        bar([[util, "gpu-util"]], { title: "utilisation" }),
        bar([[mem, "gpu-mem"]], { title: "memory" }));
    });
  }

  function renderEngines(engines, gpu) {
    const list = Object.entries(engines || {});
    if (!list.length) {
      $("engines").replaceChildren(empty("No local engines: every alias is served hosted."));
      return;
    }
    $("engines").replaceChildren(...list.map(([name, e]) => {
      const score = isNum(e.score) ? e.score : null;
      const state = !e.healthy ? "down" : e.saturated ? "saturated" : "ok";
      const scoreCls = !e.healthy ? "muted" : e.saturated ? "bad" : score >= 0.7 ? "warn" : "ok";
      const stale = isNum(e.metrics_age_s) && e.metrics_age_s > 3;
      return h("article", {
        class: `card engine engine-${state}`, "data-testid": "engine-card", "data-engine": name,
        "data-healthy": String(Boolean(e.healthy)), "data-saturated": String(Boolean(e.saturated)),
      },
      h("header", {},
        h("div", {}, h("strong", { class: "engine-name" }, name),
          h("span", { class: "muted" }, ` alias ${e.alias || DASH}`)),
        h("div", { class: "badges" },
          e.healthy ? badge("healthy", "ok", { "data-testid": "engine-health" })
            : badge("down", "bad", { "data-testid": "engine-health", title: e.down_reason || "" }),
          e.healthy ? (e.saturated ? badge("saturated", "bad", { "data-testid": "engine-saturation" })
            : badge("has room", "ok subtle", { "data-testid": "engine-saturation" })) : null)),
      // A managed engine that failed carries its exit and the last lines of its own log.
      !e.healthy && e.down_reason ? h("p", {
        class: e.down_reason.includes("\n") ? "down-reason log-tail" : "down-reason",
        "data-testid": "engine-down-reason",
      }, e.down_reason) : null,
      h("div", { class: "score" },
        h("span", { class: "label" }, "load score"),
        bar([[score, `score-fill ${scoreCls}`]], { "data-testid": "engine-score-bar" }),
        h("span", { class: "score-value", "data-testid": "engine-score" }, num(score, 2))),
      h("dl", { class: "facts grid3" }, facts([
        ["in flight", int(e.inflight), "engine-inflight"],
        ["waiting", int(e.waiting), "engine-waiting"],
        ["running", int(e.running), "engine-running"],
        ["KV cache", pct(e.kv_cache), "engine-kv"],
        ["tokens/s", num(e.tokens_per_s), "engine-tps"],
        ["metrics age", h("span", { class: stale ? "warn" : "" }, secs(e.metrics_age_s)),
          "engine-age"],
      ])),
      gpuLines(name, gpu));
    }));
  }

  function renderAliases(aliases) {
    const list = Object.entries(aliases || {});
    if (!list.length) {
      $("aliases").replaceChildren(empty("No aliases configured."));
      return;
    }
    $("aliases").replaceChildren(h("ul", { class: "aliases" }, list.map(([name, a]) =>
      h("li", { "data-alias": name, "data-ready": String(Boolean(a.ready)) },
        badge(a.ready ? "ready" : "no backend", a.ready ? "ok" : "bad"),
        h("strong", {}, name),
        h("span", { class: "muted backends", title: (a.backends || []).join(" → ") },
          (a.backends || []).join(" → ") || DASH)))));
  }

  // Tiered aliases: each tier's share of today's answers, the escalated ones among them
  // (score, sticky conversation, cascade) and the cascade's wasted lower-tier calls.
  const TIER_FILLS = ["ok", "gpu-util", "warn", "gpu-mem", "bad"];
  // The inbound APIs, in this order, then any other the gateway reports.
  const API_ORDER = ["chat", "messages", "responses", "completions", "fim", "embeddings",
    "batches"];

  function renderApis(apis) {
    const per = apis || {};
    const names = [...API_ORDER.filter((n) => n in per),
      ...Object.keys(per).filter((n) => !API_ORDER.includes(n)).sort()];
    if (!names.length) {
      $("apis").replaceChildren(empty("No requests today."));
      return;
    }
    const row = (name) => {
      const a = per[name];
      return h("tr", { "data-testid": "api-row", "data-api": name },
        h("td", {}, name),
        h("td", { class: "num", "data-testid": "api-requests" }, int(a.requests || 0)),
        h("td", { class: "num", "data-testid": "api-errors" },
          `${int(a.errors || 0)} · ${pct(a.requests ? (a.errors || 0) / a.requests : 0)}`),
        h("td", { class: "num", "data-testid": "api-tokens" },
          `${int(a.prompt_tokens || 0)} / ${int(a.completion_tokens || 0)}`),
        h("td", { class: "num", "data-testid": "api-cost" }, usd(a.cost_usd || 0)));
    };
    $("apis").replaceChildren(
      h("table", { class: "mini" },
        h("thead", {}, h("tr", {}, h("th", {}, "API"), h("th", { class: "num" }, "requests"),
          h("th", { class: "num", title: "answered with a 4xx or 5xx status" }, "errors"),
          h("th", { class: "num", title: "prompt / completion tokens" }, "tokens in / out"),
          h("th", { class: "num" }, "cost"))),
        h("tbody", {}, names.map(row))));
  }

  function renderTiers(t) {
    const aliases = Object.entries((t && t.aliases) || {});
    if (!aliases.length) {
      $("tiers").replaceChildren(empty("No tiered alias configured."));
      return;
    }
    const per = t.tiers || {};
    // Tiers in their configured order (everyday first), then any left from a reload.
    const names = [...new Set([...aliases.flatMap(([, tiers]) => tiers), ...Object.keys(per)])];
    const fill = (i) => TIER_FILLS[Math.min(i, TIER_FILLS.length - 1)];
    const row = (name, i) => {
      const c = per[name] || {};
      return h("tr", { "data-testid": "tier-row", "data-tier": name },
        h("td", {}, h("span", { class: `swatch fill ${fill(i)}` }), name),
        h("td", { class: "num", "data-testid": "tier-calls" }, int(c.calls || 0)),
        h("td", { class: "num", "data-testid": "tier-share" }, pct(c.share || 0)),
        h("td", { class: "num" }, usd(c.cost_usd || 0)),
        h("td", { class: "num", "data-testid": "tier-escalated" },
          `${int(c.escalated || 0)} · ${usd(c.escalated_cost_usd || 0)}`),
        h("td", { class: "num", "data-testid": "tier-wasted" },
          `${int(c.wasted || 0)} · ${usd(c.wasted_usd || 0)}`));
    };
    const reasons = Object.entries(t.reasons || {}).sort((a, b) => b[1] - a[1]);
    $("tiers").replaceChildren(
      h("div", { class: "muted small" }, aliases.map(([n, tiers]) => `${n}: ${tiers.join(" → ")}`)
        .join(" · ")),
      bar(names.map((n, i) => [(per[n] && per[n].share) || 0, fill(i)]),
        { "data-testid": "tiers-bar", title: "share of today's answers per tier" }),
      h("table", { class: "mini" },
        h("thead", {}, h("tr", {}, h("th", {}, "tier"), h("th", { class: "num" }, "answers"),
          h("th", { class: "num" }, "share"), h("th", { class: "num" }, "cost"),
          h("th", { class: "num", title: "answers above the everyday tier because of the " +
            "score, a sticky conversation or the cascade, and what they cost" }, "escalated"),
          h("th", { class: "num", title: "lower-tier answers the cascade re-sent one tier " +
            "up, and what they cost" }, "wasted"))),
        h("tbody", {}, names.map(row))),
      h("dl", { class: "facts" }, facts([
        ["answers today", int(t.calls), "tiers-calls"],
        ["escalated answers · their cost", `${int(t.escalated)} · ${usd(t.escalated_cost_usd)}`,
          "tiers-escalated"],
        ["wasted cascade calls · their cost", `${int(t.wasted)} · ${usd(t.wasted_usd)}`,
          "tiers-wasted"],
        ["why", reasons.length ? reasons.map(([r, n]) => `${r} ${n}`).join(", ") : DASH,
          "tiers-reasons"],
      ])));
  }

  function renderBreakers(breakers) {
    const list = Object.entries(breakers || {});
    if (!list.length) {
      $("breakers").replaceChildren(empty("No hosted upstream called yet."));
      return;
    }
    const kind = { closed: "ok", "half-open": "warn", open: "bad" };
    $("breakers").replaceChildren(h("table", { class: "mini" },
      h("thead", {}, h("tr", {}, h("th", {}, "upstream"), h("th", {}, "state"),
        h("th", { class: "num" }, "failures"), h("th", { class: "num" }, "retry in"))),
      h("tbody", {}, list.map(([name, b]) => h("tr", {
        "data-testid": "breaker-row", "data-upstream": name, "data-state": b.state,
      },
      h("td", { class: "ellipsis", title: name }, name),
      h("td", {}, badge(b.state, kind[b.state] || "neutral")),
      h("td", { class: "num" }, int(b.consecutive_failures)),
      h("td", { class: "num" }, b.state === "closed" ? DASH : secs(b.retry_in_s)))))));
  }

  function renderHost(host, gpu) {
    host = host || {};
    const cpu = isNum(host.cpu_percent) ? host.cpu_percent / 100 : null;
    const mem = isNum(host.memory_used_bytes) && host.memory_total_bytes
      ? host.memory_used_bytes / host.memory_total_bytes : null;
    const cpuCls = cpu >= 0.9 ? "bad" : cpu >= 0.7 ? "warn" : "ok";
    const memCls = mem >= 0.9 ? "bad" : mem >= 0.8 ? "warn" : "ok";
    const load = (host.load_average || []).map((v) => num(v, 2)).join(" · ") || DASH;
    const gpuText = gpu && gpu.available ? `${int(gpu.count)} visible` : "none";
    $("host").replaceChildren(...[
      h("div", { class: "meter" }, h("span", { class: "label" }, `CPU ${pct(cpu)}`),
        bar([[cpu, cpuCls]]), h("span", { class: "muted" }, `${int(host.cpu_count)} cores`)),
      h("div", { class: "meter" }, h("span", { class: "label" }, `RAM ${pct(mem)}`),
        bar([[mem, memCls]]),
        h("span", { class: "muted" }, `${gib(host.memory_used_bytes)} / ${gib(host.memory_total_bytes)}`)),
      h("dl", { class: "facts" }, facts([["load 1 · 5 · 15 min", load], ["GPUs", gpuText, "host-gpu"]])),
      gpu && !gpu.available && gpu.reason ? h("p", { class: "small muted gpu-reason" }, gpu.reason) : null,
    ].filter(Boolean));
  }

  // Why a request went where it went: green when local served it as planned, blue for a
  // rule or an explicit choice, amber for a spill or a retry; refusals are red by status.
  const REASON_KIND = {
    "local-ok": "ok", "cost-first-waited": "ok",
    forced: "info", capability: "info", "hosted-only": "info", license: "info",
    residency: "info", "context-length": "info",
    "local-saturated": "warn", "local-down": "warn", "local-error": "warn",
    "cost-first-spill": "warn", failover: "warn", budget: "warn", "circuit-open": "warn",
  };
  function reasonKind(reason, status) {
    if (isNum(status) && status >= 400) return "bad";
    return REASON_KIND[reason] || "neutral";
  }

  function renderDecisions(recent) {
    const body = $("decisions-body");
    if (!recent || !recent.length) {
      body.replaceChildren(h("tr", {}, h("td", { colspan: 14, class: "empty muted" },
        "No requests yet.")));
      return;
    }
    body.replaceChildren(...recent.map((r) => {
      const status = isNum(r.status) ? r.status : null;
      const statusCls = status === null ? "" : status >= 500 ? "bad" : status >= 400 ? "warn" : "ok";
      const attempts = Array.isArray(r.attempts) ? r.attempts : [];
      const tokens = isNum(r.prompt_tokens) || isNum(r.completion_tokens)
        ? `${int(r.prompt_tokens)} → ${int(r.completion_tokens)}` : DASH;
      return h("tr", {
        "data-testid": "decision-row", "data-request-id": r.request_id || "",
        "data-route": r.route || "", "data-reason": r.reason || "", "data-status": status ?? "",
        "data-priority": r.priority || "",
      },
      h("td", { class: "mono", title: isNum(r.ts) ? new Date(r.ts * 1000).toISOString() : "" },
        clock(r.ts)),
      h("td", { class: "mono ellipsis", title: r.request_id || "" }, r.request_id || DASH),
      h("td", {}, r.caller || DASH),
      h("td", {}, `${r.alias || DASH} · ${r.endpoint || DASH}`, r.stream ? h("span", {
        class: "tag" }, "stream") : null, r.priority ? h("span", {
        class: `tag priority-${r.priority}`, "data-testid": "decision-priority",
        title: "traffic class" }, r.priority) : null),
      h("td", {}, r.route ? badge(r.route, `route ${r.route}`) : DASH),
      h("td", { class: "ellipsis", title: r.backend || "" }, r.backend || DASH),
      h("td", {}, r.reason ? badge(r.reason, reasonKind(r.reason, status),
        { "data-testid": "decision-reason" }) : DASH),
      h("td", { class: `num ${statusCls}` }, status ?? DASH),
      h("td", { class: "num" }, ms(r.latency_ms)),
      h("td", { class: "num" }, ms(r.ttft_ms)),
      h("td", { class: "num" }, r.waited_ms ? ms(r.waited_ms) : DASH),
      h("td", { class: "num" }, tokens),
      h("td", { class: "num", title: isNum(r.hosted_equiv_usd)
        ? `all-hosted equivalent ${usd(r.hosted_equiv_usd)}` : "" }, usd(r.cost_usd)),
      h("td", { class: "num", title: attempts.join(" → ") }, attempts.length || DASH));
    }));
  }

  // The call ledger's store: ok, or failing since when, with the rows waiting in the spool.
  function renderLedger(l) {
    if (!l) {
      $("ledger").replaceChildren(empty("No ledger state reported."));
      return;
    }
    const failing = l.state === "failing";
    const kind = l.refusing ? "bad" : failing ? "warn" : "ok";
    const label = l.refusing ? "refusing calls" : failing ? "failing: spooling" : "ok";
    $("ledger").replaceChildren(h("p", {
      "data-state": l.state || "", "data-refusing": String(Boolean(l.refusing)),
    },
    badge(label, kind, { "data-testid": "ledger-state" }), " ",
    h("span", { class: "muted", title: l.error || "" }, failing
      ? `since ${clock(l.failing_since)} (${secs(l.failing_for_s)}): ${l.error || ""}` : ""),
    h("br", {}),
    h("span", { class: "muted" }, `spooled rows ${int(l.spooled_rows)}`
      + (isNum(l.spool_max_bytes) ? ` · spool ${pct(l.spool_bytes / l.spool_max_bytes)} full` : "")
      + (l.rows_lost_total ? ` · ${int(l.rows_lost_total)} rows lost` : ""))));
  }

  function render(d) {
    renderHeader(d);
    renderToday(d.today);
    renderSplit(d.series, d.today);
    renderSpend(d.budgets, d.today);
    renderEngines(d.engines, d.gpu);
    renderAliases(d.aliases);
    renderApis(d.apis);
    renderTiers(d.tiers);
    renderBreakers(d.breakers);
    renderHost(d.host, d.gpu);
    renderLedger(d.ledger);
    renderDecisions(d.recent);
  }

  // --- state: key, errors, freshness ---------------------------------------------------

  let lastOk = null; // Date of the last successful refresh
  let timer = null;

  // The admin key is kept for this tab only (sessionStorage: it survives a reload, not
  // the tab), never in localStorage, where it would outlive the session in plaintext.
  function storedKey() {
    try {
      localStorage.removeItem(KEY_STORE); // left there by an earlier version of this page
    } catch {
      // Storage refused: nothing can be left there either.
    }
    try {
      return sessionStorage.getItem(KEY_STORE) || "";
    } catch {
      return "";
    }
  }
  function storeKey(key) {
    try {
      if (key) sessionStorage.setItem(KEY_STORE, key);
      else sessionStorage.removeItem(KEY_STORE);
    } catch {
      // Storage refused (private mode): the key lives in memory until the page is closed.
    }
    sessionKey = key;
  }
  let sessionKey = storedKey();

  function setState(state) {
    $("app").dataset.state = state;
  }

  function showError(message) {
    const el = $("fetch-error");
    const since = lastOk ? ` Showing data from ${lastOk.toLocaleTimeString("en-GB")}.` : "";
    el.textContent = `Cannot refresh: ${message}.${since}`;
    el.hidden = false;
    setState("error");
    $("ready").textContent = "state unknown";
    $("ready").className = "badge bad";
  }

  function clearError() {
    $("fetch-error").hidden = true;
    $("fetch-error").textContent = "";
  }

  function updateAge() {
    const el = $("last-update");
    if (!lastOk) return;
    const age = Math.max(0, Math.round((Date.now() - lastOk.getTime()) / 1000));
    el.textContent = `last update ${lastOk.toLocaleTimeString("en-GB")} (${age} s ago)`;
    el.classList.toggle("stale", age > 5);
  }

  function askForKey(message) {
    setState("need-key");
    $("key-message").textContent = message;
    $("key-form").hidden = false;
    $("forget-key").hidden = true;
    $("key-input").focus();
  }

  async function errorMessage(res) {
    try {
      const body = await res.json();
      return { message: body.error.message || res.statusText, code: body.error.code };
    } catch {
      return { message: res.statusText || `HTTP ${res.status}`, code: null };
    }
  }

  function schedule(delay = REFRESH_MS) {
    clearTimeout(timer);
    timer = setTimeout(refresh, delay);
  }

  async function refresh() {
    timer = null;
    const key = sessionKey;
    const headers = { accept: "application/json" };
    if (key) headers.authorization = `Bearer ${key}`;
    const ctrl = new AbortController();
    const deadline = setTimeout(() => ctrl.abort(), FETCH_TIMEOUT_MS);
    let res;
    try {
      res = await fetch("/status", { headers, signal: ctrl.signal, cache: "no-store" });
    } catch (err) {
      showError(err.name === "AbortError"
        ? `GET /status took longer than ${FETCH_TIMEOUT_MS / 1000} s`
        : `the gateway is unreachable (${err.message})`);
      schedule();
      return;
    } finally {
      clearTimeout(deadline);
    }
    if (res.status === 401 || res.status === 403) {
      const err = await errorMessage(res);
      if (err.code === "admin_disabled") {
        // No key can help: the gateway has callers but no admin key configured.
        showError(err.message);
        schedule(10 * REFRESH_MS);
        return;
      }
      if (key) storeKey("");
      askForKey(key ? `The key was refused: ${err.message}.`
        : "This gateway has callers configured: GET /status needs the admin key.");
      return; // polling resumes when a key is submitted
    }
    if (!res.ok) {
      const err = await errorMessage(res);
      showError(`GET /status answered ${res.status} (${err.message})`);
      schedule();
      return;
    }
    let data;
    try {
      data = await res.json();
    } catch {
      showError("GET /status did not return JSON");
      schedule();
      return;
    }
    try {
      render(data);
    } catch (err) {
      showError(`the page could not draw this status (${err.message})`);
      console.error(err);
      schedule();
      return;
    }
    lastOk = new Date();
    clearError();
    updateAge();
    $("key-form").hidden = true;
    $("forget-key").hidden = !key;
    setState("live");
    schedule();
  }

  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) return;
    storeKey(key);
    $("key-input").value = "";
    $("key-form").hidden = true;
    setState("loading");
    schedule(0);
  });
  $("forget-key").addEventListener("click", () => {
    storeKey("");
    schedule(0);
  });
  setInterval(updateAge, 1000);
  refresh();
})();
