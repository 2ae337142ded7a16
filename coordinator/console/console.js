// aviary's web console (docs/SERVICE.md, "Web console"): renders the page named by
// <body data-page> from the coordinator's JSON API (/api) and follows its server-sent events.
// Plain browser JavaScript, no build step; charts are Debian's libjs-dygraphs (window.Dygraph).
'use strict';

(function () {
  const page = document.body.dataset.page;
  const main = document.getElementById('main');
  const TERMINAL_JOB = new Set(['JOB_STATE_SUCCEEDED', 'JOB_STATE_FAILED', 'JOB_STATE_CANCELLED']);
  const TERMINAL_TASK = new Set(['TASK_STATE_SUCCEEDED', 'TASK_STATE_FAILED', 'TASK_STATE_CANCELLED']);
  const COLORS = ['#2563eb', '#dc2626', '#16a34a', '#9333ea', '#ea580c', '#0891b2', '#db2777', '#65a30d',
                  '#4f46e5', '#b45309', '#0d9488', '#7c3aed'];
  const METRICS = {
    val_auc: 'val PR-AUC (micro, monitor)', val_roc_auc: 'val ROC-AUC (macro)', val_cmap: 'val cmAP (padded)',
    val_loss: 'val loss', train_loss: 'train loss', val_acc: 'val accuracy', train_acc: 'train accuracy',
    lr: 'learning rate',
  };
  // train.monitor (JobInfo.monitor) -> the history column it watches, and +1 maximised / -1 minimised.
  const MONITORS = {auc: ['val_auc', 1], roc_auc: ['val_roc_auc', 1], cmap: ['val_cmap', 1], acc: ['val_acc', 1],
                    loss: ['val_loss', -1]};
  // The compare page draws at most this many tasks unless chosen by hand (one colour each).
  const DEFAULT_TASKS = COLORS.length;
  // The most tasks of one job whose history the compare page asks for by name (a longer URL than
  // the server reads); more: the job's whole history.
  const HISTORY_TASKS_MAX = 200;
  let session = {role: '', grafana_url: ''};

  // ---------------------------------------------------------------------------------------------
  // Helpers.

  // el('div', {class: 'x', onclick: f}, child, 'text', ...): DOM without innerHTML (data is text).
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
      else if (k === 'class') node.className = v;
      else if (k === 'dataset') Object.assign(node.dataset, v);
      else node.setAttribute(k, v === true ? '' : v);
    }
    for (const c of children.flat()) {
      if (c === undefined || c === null || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }
  // Replaces the node's children, skipping null / undefined / false (as el does).
  function fill(node, ...children) {
    node.replaceChildren(...children.flat().filter((c) => c !== undefined && c !== null && c !== false));
  }
  // Updates a table body to `rows` (each with data-key) in place: rows and cells whose content
  // did not change stay the same nodes, so a link under the pointer is not swapped mid-click.
  function patchRows(tbody, rows) {
    const old = new Map([...tbody.children].map((r) => [r.dataset.key, r]));
    let previous = null;
    for (const row of rows) {
      let current = old.get(row.dataset.key);
      if (current && current.cells.length === row.cells.length) {
        old.delete(row.dataset.key);
        [...row.cells].forEach((cell, i) => {
          const mine = current.cells[i];
          if (mine.innerHTML !== cell.innerHTML || mine.className !== cell.className) mine.replaceWith(cell);
        });
        for (const [k, v] of Object.entries(row.dataset)) current.dataset[k] = v;
      } else {
        if (current) { old.delete(row.dataset.key); current.replaceWith(row); }
        current = row;
      }
      const want = previous ? previous.nextSibling : tbody.firstChild;
      if (want !== current) tbody.insertBefore(current, want);
      previous = current;
    }
    for (const stale of old.values()) stale.remove();
  }
  function num(v) {
    if (v === undefined || v === null || v === '' || v === 'NaN') return NaN;
    return Number(v);
  }
  function fmt(v, digits) {
    const x = num(v);
    return Number.isFinite(x) ? x.toFixed(digits === undefined ? 3 : digits) : '\u2014';
  }
  function fmtLr(v) {
    const x = num(v);
    return Number.isFinite(x) ? x.toExponential(2) : '\u2014';
  }
  function duration(seconds) {
    if (!Number.isFinite(seconds) || seconds < 0) return '\u2014';
    if (seconds < 60) return `${Math.round(seconds)} s`;
    if (seconds < 3600) return `${Math.round(seconds / 60)} min`;
    if (seconds < 86400) return `${(seconds / 3600).toFixed(1)} h`;
    return `${(seconds / 86400).toFixed(1)} d`;
  }
  function age(unixMs) {
    const ms = num(unixMs);
    return ms > 0 ? duration((Date.now() - ms) / 1000) : '\u2014';
  }
  function stateName(state) {
    return String(state || '').replace(/^(JOB|TASK)_STATE_/, '').toLowerCase();
  }
  function badge(state) {
    const name = stateName(state);
    return el('span', {class: `badge state-${name}`}, name === 'leased' ? 'running' : name);
  }
  function taskName(task) { return task.task_id.split('/').slice(1).join('/'); }
  function shortId(id) { return id ? id.slice(0, 9) + '\u2026' : ''; }
  // The epochs a task has finished (its latest point's epoch counts once it is an epoch end).
  function epochsDone(task) {
    const latest = task.latest || {};
    if (latest.epoch === undefined) return 0;
    return latest.epoch_end ? latest.epoch + 1 : latest.epoch;
  }
  function hasMetrics(m) { return m && (Number.isFinite(num(m.val_auc)) || Number.isFinite(num(m.val_roc_auc))); }
  // Best val ROC-AUC and PR-AUC of a job: the tasks' best epochs (or latest epoch ends).
  function jobBest(job) {
    let roc = NaN, pr = NaN;
    for (const t of job.tasks || []) {
      for (const m of [t.best, t.latest && t.latest.epoch_end ? t.latest : null]) {
        if (!hasMetrics(m)) continue;
        const r = num(m.val_roc_auc), p = num(m.val_auc);
        if (Number.isFinite(r) && !(r <= roc)) roc = r;
        if (Number.isFinite(p) && !(p <= pr)) pr = p;
      }
    }
    return {roc, pr};
  }
  function tagsOf(job) {
    // JobInfo.tags is a map (submit --tag K[=V]); a bare K has the value "".
    const tags = Object.entries(job.tags || {}).map(([k, v]) => (v === '' ? k : k + '=' + v));
    return el('span', {class: 'tags'}, tags.map((t) => el('span', {class: 'tag'}, t)),
              job.note ? el('span', {class: 'note', title: job.note}, job.note) : null);
  }

  async function api(path, options) {
    const opts = Object.assign({credentials: 'same-origin'}, options || {});
    opts.headers = Object.assign({'X-Aviary-Console': '1', Accept: 'application/json'}, opts.headers || {});
    // A coordinator that takes a request and never answers must not leave it pending for ever.
    if (!opts.signal && window.AbortSignal && AbortSignal.timeout) opts.signal = AbortSignal.timeout(30000);
    let response;
    try {
      response = await fetch(path, opts);
    } catch (e) {
      if (e && (e.name === 'TimeoutError' || e.name === 'AbortError')) throw new Error('the coordinator did not answer within 30 s');
      throw e;
    }
    let body = null;
    try { body = await response.json(); } catch (e) { body = null; }
    if (response.status === 401 && page) {
      location.href = '/login?next=' + encodeURIComponent(location.pathname + location.search + location.hash);
    }
    if (!response.ok) {
      const error = body && body.error ? `${body.error.code}: ${body.error.message}` : `HTTP ${response.status}`;
      const err = new Error(error);
      err.status = response.status;
      throw err;
    }
    return body;
  }

  function setLive(state) {
    const live = document.getElementById('live');
    live.className = `live live-${state}`;
    live.textContent = {on: 'live', off: 'reconnecting\u2026', done: 'finished'}[state] || state;
    live.title = {on: 'updates arrive as the groups report', off: 'the coordinator is unreachable; retrying',
                  done: 'the job is finished; nothing more will arrive'}[state] || '';
  }

  // A server-sent event stream that reconnects (EventSource retries by itself after a network
  // error; an HTTP error closes it, so it is reopened here). onOpen runs on every (re)connect:
  // the page reloads its state then, so nothing is missed across a coordinator restart. It also
  // runs when an HTTP error closed the stream, to find out why: the page's own calls go to
  // /login on a 401 (a reload revoked the token) and show a 404 (a deleted job), and with all
  // streams taken (429) the page still shows its data. The reopen then waits 2 s, doubling up
  // to 30 s.
  // The server sends a `ping` every 3 s when nothing else went: a stream silent for 35 s is a
  // dead connection that the browser has not noticed (a laptop's sleep, a NAT that forgot it),
  // closed and opened again here.
  function stream(path, handlers, onOpen) {
    let source = null;
    let stopped = false;
    let delay = 2000;
    let heard = Date.now();
    const watchdog = setInterval(() => {
      if (stopped || !source || source.readyState !== EventSource.OPEN || Date.now() - heard < 35000) return;
      source.close();
      setLive('off');
      heard = Date.now();
      open();
    }, 5000);
    function open() {
      if (stopped) return;
      source = new EventSource(path);
      source.onmessage = () => { heard = Date.now(); };
      source.addEventListener('ping', () => { heard = Date.now(); });
      source.onopen = () => { heard = Date.now(); delay = 2000; setLive('on'); if (onOpen) onOpen(); };
      source.onerror = () => {
        if (stopped) return;
        setLive('off');
        if (source.readyState !== EventSource.CLOSED) return;
        if (onOpen) onOpen();
        setTimeout(open, delay);
        delay = Math.min(2 * delay, 30000);
      };
      for (const [name, fn] of Object.entries(handlers)) {
        source.addEventListener(name, (e) => { heard = Date.now(); fn(JSON.parse(e.data)); });
      }
    }
    open();
    return {close() { stopped = true; clearInterval(watchdog); if (source) source.close(); }};
  }

  function errorBox(message) { return el('div', {class: 'error-box', role: 'alert'}, message); }
  function flash(message, kind, loading) {
    let box = document.getElementById('flash');
    if (!box) {
      box = el('div', {id: 'flash'});
      main.prepend(box);
    }
    box.className = `flash flash-${kind || 'error'}`;
    box.dataset.loading = loading ? '1' : '';
    box.textContent = message;
  }
  // A failed load of the page's data: said until that data loads again (a timeout, a proxy's 502
  // stayed red beside live data). What a user's action got (a refused cancel) stays.
  function loadError(message) { flash(message, 'error', true); }
  function clearLoadError() {
    const box = document.getElementById('flash');
    if (box && box.dataset.loading === '1') box.remove();
  }

  // ---------------------------------------------------------------------------------------------
  // Charts (dygraphs): one per metric group, x = epoch (0-based, as history.csv and the reports
  // number them), the best epoch marked.

  function chart(container, title, labels, rows, options) {
    const legend = el('div', {class: 'chart-legend'});
    const plot = el('div', {class: 'chart-plot'});
    const box = el('div', {class: 'chart'}, el('div', {class: 'chart-title'}, title), plot, legend);
    container.append(box);
    const state = {best: options && options.best, graph: null, plot, box};
    const opts = {
      labels, xlabel: 'epoch', connectSeparatedPoints: true, drawPoints: true, pointSize: 2.5,
      strokeWidth: 2, colors: COLORS, legend: 'always', labelsDiv: legend, labelsSeparateLines: false,
      animatedZooms: false, gridLineColor: '#e5e7eb', axisLineColor: '#9ca3af',
      labelsKMB: false, logscale: !!(options && options.logscale), resizable: 'passive', xRangePad: 14,
      axes: {
        x: {ticker: epochTicks, valueFormatter: (x) => `epoch ${x}`},
        y: {axisLabelWidth: 56, valueFormatter: options && options.lr ? (y) => y.toExponential(2) : (y) => y.toFixed(4),
            axisLabelFormatter: options && options.lr ? (y) => Number(y).toExponential(1) : (y) => Number(y).toFixed(2)},
      },
      underlayCallback: (ctx, area, g) => {
        if (state.best === null || state.best === undefined) return;
        const x = g.toDomXCoord(state.best);
        if (x < area.x || x > area.x + area.w) return;
        ctx.save();
        ctx.strokeStyle = '#f59e0b';
        ctx.lineWidth = 2;
        ctx.setLineDash([5, 4]);
        ctx.beginPath();
        ctx.moveTo(x, area.y);
        ctx.lineTo(x, area.y + area.h);
        ctx.stroke();
        ctx.setLineDash([]);
        ctx.fillStyle = '#b45309';
        ctx.font = '11px system-ui, sans-serif';
        ctx.fillText(`best (epoch ${state.best})`, Math.min(x + 4, area.x + area.w - 90), area.y + 12);
        ctx.restore();
      },
    };
    state.update = (newRows, best) => {
      state.best = best;
      box.dataset.points = String(newRows.length);
      box.dataset.epochs = newRows.map((r) => r[0]).join(',');
      if (!window.Dygraph) {
        plot.textContent = 'dygraphs did not load (install Debian\'s libjs-dygraphs)';
        return;
      }
      if (newRows.length === 0) {
        plot.classList.add('chart-empty');
        plot.textContent = 'no epoch has finished yet';
        if (state.graph) { state.graph.destroy(); state.graph = null; }
        return;
      }
      plot.classList.remove('chart-empty');
      if (!state.graph) {
        plot.textContent = '';
        state.graph = new window.Dygraph(plot, newRows, opts);
      } else {
        state.graph.updateOptions({file: newRows});
      }
    };
    // The graph's window listeners and resize observer go with it (dropping its box leaks them).
    state.dispose = () => { if (state.graph) { state.graph.destroy(); state.graph = null; } };
    state.update(rows, state.best);
    return state;
  }

  // Whole epochs only, at most one label per 60 px.
  function epochTicks(min, max, pixels) {
    const lo = Math.max(0, Math.ceil(min)), hi = Math.floor(max);
    const span = Math.max(1, hi - lo);
    const steps = [1, 2, 5, 10, 20, 25, 50, 100, 200, 500, 1000];
    const step = steps.find((s) => span / s <= Math.max(1, pixels / 60)) || 1000;
    const ticks = [];
    for (let e = Math.ceil(lo / step) * step; e <= hi; e += step) ticks.push({v: e, label: String(e)});
    if (lo % step !== 0) ticks.unshift({v: lo, label: String(lo)});  // the first epoch is always labelled
    return ticks;
  }

  // Rows [epoch, v1, v2, ...] from per-series Maps epoch -> value (null where missing).
  function mergeSeries(series) {
    const epochs = new Set();
    for (const s of series) for (const e of s.keys()) epochs.add(e);
    return [...epochs].sort((a, b) => a - b).map((e) => [e, ...series.map((s) => {
      const v = s.get(e);
      return Number.isFinite(v) ? v : null;
    })]);
  }

  // ---------------------------------------------------------------------------------------------
  // Jobs page.

  function progressCell(job) {
    const tasks = job.tasks || [];
    const done = tasks.filter((t) => t.state === 'TASK_STATE_SUCCEEDED').length;
    let planned = 0, finished = 0;
    for (const t of tasks) { planned += t.epochs || 0; finished += Math.min(epochsDone(t), t.epochs || 0); }
    const fraction = planned > 0 ? finished / planned : 0;
    const running = tasks.filter((t) => t.state === 'TASK_STATE_LEASED')
      .map((t) => `${taskName(t)} \u00b7 epoch ${Math.min(epochsDone(t), t.epochs - 1)}/${t.epochs - 1}`);
    return el('div', {class: 'progress-cell'},
      el('div', {class: 'progress'}, el('div', {class: 'progress-bar', style: `width:${(100 * fraction).toFixed(1)}%`})),
      el('div', {class: 'small muted'}, `${done}/${tasks.length} tasks`, running.length ? ` \u00b7 ${running.join(', ')}` : ''));
  }

  function renderJobs() {
    const selected = new Set();
    const counts = el('div', {class: 'counts'});
    const compareButton = el('button', {class: 'button', id: 'compare-selected', disabled: true,
      onclick: () => { location.href = '/compare?jobs=' + [...selected].join(','); }}, 'Compare selected');
    const tbody = el('tbody', {id: 'jobs-body'});
    const table = el('table', {class: 'table', id: 'jobs-table'},
      el('thead', {}, el('tr', {}, el('th', {class: 'narrow'}, ''), el('th', {}, 'Job'), el('th', {}, 'Name'),
        el('th', {}, 'State'), el('th', {class: 'wide'}, 'Progress'), el('th', {class: 'num'}, 'Best ROC-AUC'),
        el('th', {class: 'num'}, 'Best PR-AUC'), el('th', {class: 'num'}, 'Age'), el('th', {}, 'Tags'))),
      tbody);
    const empty = el('p', {class: 'empty muted hidden', id: 'jobs-empty'},
      'No jobs yet. Submit one with ', el('code', {}, 'aviary submit P.yaml'), '.');
    fill(main,
      el('div', {class: 'page-head'}, el('h1', {}, 'Jobs'), counts, el('div', {class: 'spacer'}), compareButton),
      el('div', {class: 'card'}, table, empty));

    function render(data) {
      const jobs = data.jobs || [];
      const byState = {};
      for (const j of jobs) byState[stateName(j.state)] = (byState[stateName(j.state)] || 0) + 1;
      fill(counts, ...Object.entries(byState).map(([s, n]) => el('span', {class: `count state-${s}`}, `${n} ${s}`)),
           data.omitted > 0
             ? el('span', {class: 'count muted', id: 'jobs-limit', title: 'large jobs (sweeps): the list is capped at 8 MB'},
                  `the newest ${jobs.length} jobs (${data.omitted} older left out)`)
             : data.beyond_limit > 0
             ? el('span', {class: 'count muted', id: 'jobs-limit', title: 'aviary list --limit N lists more'},
                  `the newest ${jobs.length} jobs (${data.beyond_limit} older)`) : null);
      empty.classList.toggle('hidden', jobs.length > 0);
      patchRows(tbody, jobs.map((job) => {
        const best = jobBest(job);
        const check = el('input', {type: 'checkbox', 'aria-label': `select ${job.job_id}`,
          onchange: (e) => {
            if (e.target.checked) selected.add(job.job_id); else selected.delete(job.job_id);
            compareButton.disabled = selected.size === 0;
            compareButton.textContent = selected.size ? `Compare selected (${selected.size})` : 'Compare selected';
          }});
        check.checked = selected.has(job.job_id);
        return el('tr', {dataset: {key: job.job_id, job: job.job_id, state: stateName(job.state)}},
          el('td', {class: 'narrow'}, check),
          el('td', {}, el('a', {class: 'mono job-link', href: `/jobs/${job.job_id}`}, job.job_id)),
          el('td', {}, job.name || el('span', {class: 'muted'}, '\u2014')),
          el('td', {}, badge(job.state)),
          el('td', {class: 'wide'}, progressCell(job)),
          el('td', {class: 'num'}, fmt(best.roc)),
          el('td', {class: 'num'}, fmt(best.pr)),
          el('td', {class: 'num', title: new Date(num(job.created_unix_ms)).toLocaleString()}, age(job.created_unix_ms)),
          el('td', {}, tagsOf(job)));
      }));
    }
    // The Age column from the last list, redrawn every 30 s: a quiet coordinator sends no event
    // (it said "2 min" for hours).
    let last = null;
    const show = (data) => { last = data; render(data); };
    setInterval(() => { if (last) render(last); }, 30000);
    const load = () => api('/api/jobs').then((j) => { clearLoadError(); show(j); }).catch((e) => loadError(e.message));
    // Jobs only: the groups' part changes every second (their heartbeat ages).
    stream('/api/events?topics=jobs', {jobs: show}, load);
  }

  // ---------------------------------------------------------------------------------------------
  // Job page.

  function renderJob() {
    const jobId = location.pathname.split('/')[2];
    let job = null;
    let checkpoints = {};
    const history = new Map();   // task_id -> Map(epoch -> {metrics, time})
    let selectedTask = null;
    let charts = null;
    let chartsTask = null;
    let configTask = null;
    let events = null;

    const head = el('div', {class: 'page-head'});
    const summary = el('div', {class: 'facts'});
    const dag = el('div', {class: 'dag', id: 'dag'});
    const taskPanel = el('section', {class: 'card task-panel', id: 'task-panel'});
    fill(main, head, summary,
      el('section', {class: 'card'}, el('h2', {}, 'Tasks'), dag), taskPanel);

    function selectFromHash() {
      const m = /task=([^&]+)/.exec(location.hash);
      if (!m) return null;
      try { return `${jobId}/${decodeURIComponent(m[1])}`; } catch (e) { return null; }  // "#task=%"
    }
    function defaultTask() {
      const tasks = job.tasks || [];
      const running = tasks.find((t) => t.state === 'TASK_STATE_LEASED');
      if (running) return running.task_id;
      const reported = tasks.filter((t) => t.latest && t.latest.epoch_end);
      return (reported.length ? reported[reported.length - 1] : tasks[0] || {}).task_id || null;
    }

    // ETA of a running task: the mean epoch time of its attempt's history times what is left.
    function eta(task) {
      if (task.state !== 'TASK_STATE_LEASED') return '\u2014';
      const points = [...(history.get(task.task_id) || new Map()).values()]
        .filter((p) => p.attempt === task.attempt).sort((a, b) => a.metrics.epoch - b.metrics.epoch);
      if (points.length < 2) return '\u2026';
      const first = points[0], last = points[points.length - 1];
      const perEpoch = (num(last.time) - num(first.time)) / 1000 / (last.metrics.epoch - first.metrics.epoch);
      const left = (task.epochs - last.metrics.epoch - 1) * perEpoch - (Date.now() - num(last.time)) / 1000;
      return left > 0 ? `~${duration(left)}` : 'soon';
    }

    // The head's parts stay the same nodes for the page's life; a part whose content changed is
    // swapped alone. The head is drawn on every event: new nodes each time would split a click
    // on Cancel or Compare across two nodes (pressed on one, released on the next) and drop the
    // keyboard focus.
    const cancelButton = el('button', {class: 'button danger', id: 'cancel-job',
      onclick: async () => {
        if (!window.confirm(`Cancel job ${jobId}?`)) return;
        try {
          // A job that ended while the dialog was open is answered as it is (not cancelled).
          const r = await api(`/api/jobs/${jobId}/cancel`, {method: 'POST'});
          if (r.state === 'JOB_STATE_CANCELLED') flash(`job ${jobId} cancelled`, 'ok');
          else flash(`job ${jobId} had already ended (${stateName(r.state)}): nothing to cancel`);
        } catch (e) { flash(`cancel refused: ${e.message}`); }
      }}, 'Cancel job');
    let headParts = null;  // [title, state badge, tags], as in the page

    function renderHead() {
      const parts = [
        el('h1', {}, el('span', {class: 'mono'}, jobId), job.name ? el('span', {class: 'subtitle'}, job.name) : null),
        badge(job.state), tagsOf(job)];
      if (!headParts) {
        headParts = parts;
        fill(head, ...parts, el('div', {class: 'spacer'}),
             el('a', {class: 'button secondary', id: 'compare-job', href: `/compare?jobs=${jobId}`}, 'Compare tasks'));
      } else {
        parts.forEach((node, i) => {
          if (node.outerHTML !== headParts[i].outerHTML) { headParts[i].replaceWith(node); headParts[i] = node; }
        });
      }
      // A viewer token may not cancel (the coordinator refuses it): no button to press.
      if (TERMINAL_JOB.has(job.state) || session.role === 'viewer') cancelButton.remove();
      else if (!cancelButton.isConnected) head.append(cancelButton);
      const facts = [['created', `${age(job.created_unix_ms)} ago`], ['updated', `${age(job.updated_unix_ms)} ago`],
                     ['tasks', String((job.tasks || []).length)]];
      // The tasks' best epochs by the monitor (from the history while they run).
      let roc = NaN, pr = NaN;
      for (const t of job.tasks || []) {
        const m = taskBest(t);
        if (!m) continue;
        // A NaN (a validation fold of one class) is no best: it replaced the others' 0.91.
        if (Number.isFinite(num(m.val_roc_auc)) && !(num(m.val_roc_auc) <= roc)) roc = num(m.val_roc_auc);
        if (Number.isFinite(num(m.val_auc)) && !(num(m.val_auc) <= pr)) pr = num(m.val_auc);
      }
      facts.push(['best ROC-AUC', fmt(roc)], ['best PR-AUC', fmt(pr)]);
      // A sweep: its best grid point by the monitor (the mean over the point's final-stage tasks).
      const best = job.sweep_best;
      if ((job.sweep || []).length && best && best.tasks > 0) {
        facts.push(['best sweep point', `p${best.point}: ${(best.overrides || []).join(', ')} ` +
                    `(${best.metric} ${fmt(num(best.value))}, ${best.tasks}/${best.tasks_total} tasks)`]);
      }
      fill(summary, ...facts.map(([k, v]) => el('div', {class: 'fact'}, el('span', {class: 'fact-key'}, k),
                                                               el('span', {class: 'fact-value'}, v))));
      if (job.error) summary.append(errorBox(job.error));
    }

    function renderDag() {
      const stages = [];
      for (const t of job.tasks || []) {
        let column = stages.find((s) => s.stage === t.stage);
        if (!column) { column = {stage: t.stage, tasks: []}; stages.push(column); }
        column.tasks.push(t);
      }
      // Within a stage of several tasks (folds, a sweep's grid), the best by the monitor.
      const leaders = new Set();
      for (const s of stages) {
        const {column, sign} = monitored(s.tasks[0]);
        const scored = s.tasks.map((t) => [t, sign * num((taskBest(t) || {})[column])])
          .filter(([, v]) => Number.isFinite(v));
        if (scored.length < 2) continue;
        scored.sort((a, b) => b[1] - a[1]);
        leaders.add(scored[0][0].task_id);
      }
      const nodes = [];
      stages.forEach((s, i) => {
        if (i > 0) nodes.push(el('div', {class: 'dag-arrow', 'aria-hidden': 'true'}, '\u2192'));
        nodes.push(el('div', {class: 'dag-column'}, el('div', {class: 'dag-stage'}, s.stage),
          s.tasks.map((t) => {
            const done = Math.min(epochsDone(t), t.epochs || 0);
            const bestAuc = (taskBest(t) || {}).val_auc;
            return el('button', {class: `task-node state-${stateName(t.state)}${t.task_id === selectedTask ? ' selected' : ''}`,
              dataset: {task: t.task_id}, type: 'button',
              onclick: () => { location.hash = `task=${encodeURIComponent(taskName(t))}`; }},
              el('div', {class: 'task-node-head'}, el('span', {class: 'mono'}, taskName(t)),
                 leaders.has(t.task_id) ? el('span', {class: 'leader', title: 'best of its stage by val PR-AUC'}, '\u2605 best') : null,
                 el('span', {class: 'spacer'}), badge(t.state)),
              el('div', {class: 'progress'}, el('div', {class: 'progress-bar',
                style: `width:${t.epochs ? (100 * done / t.epochs).toFixed(1) : 0}%`})),
              el('div', {class: 'task-node-facts small'},
                el('span', {}, `${done}/${t.epochs || '?'} epochs`),
                el('span', {}, `attempt ${t.attempt || 0}`),
                TERMINAL_TASK.has(t.state) ? null
                  : el('span', {title: t.group_id || ''}, t.group_id ? `group ${shortId(t.group_id)}` : 'waiting for a group'),
                t.state === 'TASK_STATE_LEASED' ? el('span', {}, `ETA ${eta(t)}`) : null,
                Number.isFinite(num(bestAuc)) ? el('span', {}, `best PR-AUC ${fmt(bestAuc)}`) : null));
          })));
      });
      // In place when the shape is the same (clicks on a node survive updates).
      const same = dag.children.length === nodes.length && nodes.every((n, i) => {
        const m = dag.children[i];
        if (n.className !== m.className) return false;
        if (n.className === 'dag-arrow') return true;
        return n.children.length === m.children.length &&
          [...n.children].every((c, k) => c.dataset.task === m.children[k].dataset.task);
      });
      if (!same) {
        fill(dag, ...nodes);
        return;
      }
      nodes.forEach((column, i) => {
        [...column.children].forEach((fresh, k) => {
          const mine = dag.children[i].children[k];
          if (mine.className !== fresh.className) mine.className = fresh.className;
          [...fresh.children].forEach((part, j) => {
            const current = mine.children[j];
            if (!current || current.innerHTML !== part.innerHTML) {
              if (current) current.replaceWith(part); else mine.append(part);
            }
          });
        });
      });
    }

    function taskSeries(taskId) {
      const points = [...(history.get(taskId) || new Map()).values()].sort((a, b) => a.metrics.epoch - b.metrics.epoch);
      const series = (key) => new Map(points.map((p) => [p.metrics.epoch, num(p.metrics[key])]));
      return {points, series};
    }

    // The metrics of a task's best epoch: reported at completion, else the history's best.
    function taskBest(task) {
      if (hasMetrics(task.best)) return task.best;
      const {points} = taskSeries(task.task_id);
      const epoch = bestEpoch(task, points);
      const point = points.find((p) => p.metrics.epoch === epoch);
      return point ? point.metrics : null;
    }

    // A task's monitor (its stage's train.monitor; the job's, the final stage's, for a task stored
    // without one) as a history column and a sign: the best epoch of a task still running (or
    // cancelled, failed) is the one its best.pt holds, not the highest val_auc.
    function monitored(task) {
      const [column, sign] = MONITORS[(task && task.monitor) || job.monitor] || MONITORS.auc;
      return {column, sign};
    }

    function bestEpoch(task, points) {
      if (task.best && task.best.epoch_end) return task.best.epoch;
      const {column, sign} = monitored(task);
      let best = null, bestValue = -Infinity;
      for (const p of points) {
        const v = sign * num(p.metrics[column]);
        if (Number.isFinite(v) && v > bestValue) { bestValue = v; best = p.metrics.epoch; }
      }
      return best;
    }

    async function renderTask() {
      const task = (job.tasks || []).find((t) => t.task_id === selectedTask);
      if (!task) { fill(taskPanel, el('p', {class: 'muted'}, 'Select a task above.')); return; }
      const {points, series} = taskSeries(task.task_id);
      const best = bestEpoch(task, points);
      const lossRows = mergeSeries([series('train_loss'), series('val_loss')]);
      const valRows = mergeSeries([series('val_auc'), series('val_roc_auc'), series('val_cmap')]);
      const lrRows = mergeSeries([series('lr')]);
      if (chartsTask !== task.task_id) {
        chartsTask = task.task_id;
        if (charts) Object.values(charts).forEach((c) => c.dispose());
        const facts = el('div', {class: 'facts', id: 'task-facts'});
        const grid = el('div', {class: 'charts', id: 'charts'});
        const files = el('div', {class: 'files', id: 'task-files'});
        const config = el('details', {class: 'config', id: 'task-config'}, el('summary', {}, 'Config (resolved pipeline YAML)'),
                          el('pre', {class: 'yaml'}, 'loading\u2026'));
        fill(taskPanel, el('h2', {id: 'task-title'}, 'Task ', el('span', {class: 'mono'}, task.task_id)),
                                  facts, grid, files, config);
        charts = {
          loss: chart(grid, 'Loss', ['epoch', 'train loss', 'val loss'], lossRows, {best}),
          val: chart(grid, 'Validation', ['epoch', 'PR-AUC (micro)', 'ROC-AUC (macro)', 'cmAP'], valRows, {best}),
          lr: chart(grid, 'Learning rate', ['epoch', 'lr'], lrRows, {best, lr: true}),
        };
        configTask = null;
      } else {
        charts.loss.update(lossRows, best);
        charts.val.update(valRows, best);
        charts.lr.update(lrRows, best);
      }
      const latest = task.latest || {};
      const bestMetrics = taskBest(task);
      const factsList = [['state', stateName(task.state)], ['attempt', task.attempt || 0], ['restarts', task.restarts || 0],
        ['group', task.group_id || '\u2014'], ['epochs done', `${Math.min(epochsDone(task), task.epochs)}/${task.epochs}`],
        ['steps/epoch', task.steps_per_epoch || '\u2014'], ['samples/s', fmt(latest.samples_per_s, 1)],
        ['ETA', eta(task)], ['best epoch', best === null || best === undefined ? '\u2014' : best],
        ['best PR-AUC', fmt(bestMetrics ? bestMetrics.val_auc : NaN)],
        ['best ROC-AUC', fmt(bestMetrics ? bestMetrics.val_roc_auc : NaN)]];
      const factsBox = document.getElementById('task-facts');
      fill(factsBox, ...factsList.map(([k, v]) =>
        el('div', {class: 'fact'}, el('span', {class: 'fact-key'}, k), el('span', {class: 'fact-value'}, String(v)))));
      if (task.error) factsBox.append(errorBox(task.error));
      const ckpts = checkpoints[task.task_id] || [];
      fill(document.getElementById('task-files'),
        el('div', {class: 'fact-key'}, 'run folder'), el('div', {class: 'mono path'}, task.out_dir || '\u2014'),
        el('div', {class: 'fact-key'}, 'best checkpoint'), el('div', {class: 'mono path'}, task.best_checkpoint || '\u2014'),
        el('div', {class: 'fact-key'}, `checkpoints reported (${ckpts.length})`),
        el('div', {class: 'mono path small'}, ckpts.length ? ckpts.slice(-6).map((c) =>
          el('div', {}, `epoch ${c.epoch}${c.best ? ' (best)' : ''} \u00b7 attempt ${c.attempt} \u00b7 ${c.path}`)) : '\u2014'));
      if (configTask !== task.task_id) {
        configTask = task.task_id;
        const pre = document.querySelector('#task-config pre');
        api(`/api/jobs/${jobId}/tasks/${encodeURIComponent(taskName(task))}/config`)
          .then((c) => { pre.textContent = c.yaml; })
          .catch((e) => { pre.textContent = e.message; });
      }
    }

    function render() {
      if (!job) return;
      const wanted = selectFromHash();
      selectedTask = wanted && (job.tasks || []).some((t) => t.task_id === wanted) ? wanted : defaultTask();
      document.title = `${jobId} \u00b7 aviary`;
      renderHead();
      renderDag();
      renderTask();
    }

    // The epoch ends that came by event while a load() ran: its history may have been read
    // before them, and its refill wiped them (a gap in the curves until the next reload).
    const loadsRunning = new Set();  // each running load's [[taskId, attempt, metrics, time]]
    function addPoint(taskId, attempt, metrics, time, into) {
      const target = into || history;
      if (!target.has(taskId)) target.set(taskId, new Map());
      target.get(taskId).set(metrics.epoch, {metrics, attempt, time});
      if (!into) for (const arrived of loadsRunning) arrived.push([taskId, attempt, metrics, time]);
    }

    async function load() {
      const arrived = [];
      loadsRunning.add(arrived);
      try {
        const [j, h] = await Promise.all([api(`/api/jobs/${jobId}`), api(`/api/jobs/${jobId}/history`)]);
        checkpoints = j.checkpoints || {};
        // The job as an event of the meantime left it, if that is newer than the one read.
        job = job && num(job.updated_unix_ms) > num(j.updated_unix_ms) ? Object.assign({}, job, {checkpoints}) : j;
        const fresh = new Map();
        for (const row of h.rows || []) addPoint(row.task_id, row.attempt, row.metrics, row.time_unix_ms, fresh);
        for (const point of arrived) addPoint(...point, fresh);
        history.clear();
        for (const [taskId, points] of fresh) history.set(taskId, points);
        clearLoadError();
        render();
        return true;
      } catch (e) {
        // The points stay in `history` (added there too): the next load gets them.
        if (e.status === 404) {
          fill(main, errorBox(e.message));
          if (events) events.close();  // a deleted (or never seen) job: nothing more will come
          if (retryWatch) clearInterval(retryWatch);
          job = null;  // a render still pending (an event's, the checkpoint reload's) draws nothing
        } else {
          loadError(e.message);
        }
        return false;
      } finally {
        loadsRunning.delete(arrived);
      }
    }

    // One task's reported checkpoints, merged into the job's (the whole list comes with load()).
    function loadCheckpoints(taskId) {
      if (!taskId) return;
      api(`/api/jobs/${jobId}?task=${encodeURIComponent(taskId)}`)
        .then((j) => { checkpoints = Object.assign({}, checkpoints, j.checkpoints || {}); render(); })
        .catch((e) => loadError(`checkpoints of ${taskId}: ${e.message}`));
    }
    // Another task shown: its list as it is now (the refreshes were for the one shown before).
    window.addEventListener('hashchange', () => { render(); loadCheckpoints(selectedTask); });
    let reloadTimer = null;
    let droppedTimer = null;
    // Events are drawn at most every 200 ms: each carries the whole job, and a sweep's groups
    // report many a second (every event still updates `job` and the curves' points; only the
    // DOM work is coalesced).
    let renderTimer = null;
    function renderSoon() {
      if (renderTimer) return;
      renderTimer = setTimeout(() => { renderTimer = null; render(); }, 200);
    }
    // After the job's end the stream is closed; `aviary retry` can start the job again under the
    // same id, so the page looks every 15 s and follows it again once it is no longer finished.
    let retryWatch = null;
    function watchForRetry(loaded) {
      retryWatch = setInterval(() => {
        api(`/api/jobs/${jobId}?checkpoints=0`).then((j) => {
          if (TERMINAL_JOB.has(j.state)) {
            // The load at the end failed (a coordinator restarting just then): the finished job
            // as it is, once it loads.
            if (!loaded) load().then((ok) => { if (ok) { loaded = true; setLive('done'); } });
            return;
          }
          clearInterval(retryWatch);
          retryWatch = null;
          follow();
        }).catch((e) => {
          if (e.status !== 404) return;
          clearInterval(retryWatch);  // deleted: nothing to wait for
          retryWatch = null;
          fill(main, errorBox(e.message));
        });
      }, 15000);
    }
    const follow = () => { events = stream(`/api/jobs/${jobId}/events`, {
      job: (event) => {
        const previous = job;
        job = Object.assign({}, event.job, {checkpoints});
        // The page fell behind and the coordinator dropped events (scheduler.cc, WatchJob): the
        // epoch ends among them are read back from the history (at most once a second).
        if (typeof event.message === 'string' && event.message.startsWith('(events were dropped')) {
          if (!droppedTimer) droppedTimer = setTimeout(() => { droppedTimer = null; load(); }, 1000);
        }
        const m = event.metrics;
        if (event.task_id && m && m.epoch_end) {
          const task = (job.tasks || []).find((t) => t.task_id === event.task_id);
          addPoint(event.task_id, task ? task.attempt : 0, m, Date.now());
        }
        // An epoch end of the shown task (checkpoints follow it) or a task's new state: refresh
        // the shown task's checkpoint list (at most once a second; one task's rows, not the job's:
        // a sweep reports an epoch end every few seconds).
        const changed = !previous || (m && m.epoch_end && event.task_id === selectedTask) ||
          (job.tasks || []).some((t, i) => !previous.tasks || !previous.tasks[i] || previous.tasks[i].state !== t.state);
        if (changed && !reloadTimer) {
          reloadTimer = setTimeout(() => { reloadTimer = null; loadCheckpoints(selectedTask); }, 1000);
        }
        renderSoon();
      },
      end: () => {
        events.close();
        // A failed load (a blip) still watches: the retry watch loads the job again.
        load().then((ok) => { setLive(ok ? 'done' : 'off'); watchForRetry(ok); });
      },
    }, load); };
    follow();
    setInterval(() => { if (job && !TERMINAL_JOB.has(job.state)) { renderDag(); } }, 5000);
  }

  // ---------------------------------------------------------------------------------------------
  // Compare page.

  function renderCompare() {
    const params = new URLSearchParams(location.search);
    const chosenJobs = new Set((params.get('jobs') || '').split(',').filter(Boolean));
    let chosenTasks = new Set((params.get('tasks') || '').split(',').filter(Boolean));
    // Tasks picked by hand (or in the link): kept across reloads (a stream's reconnect), and a job
    // added later brings its own tasks; else every task of the chosen jobs.
    let tasksByHand = params.get('tasks') !== null;
    let pickerKey = null;  // what the job picker shows; redrawn only when it changes
    let metric = params.get('metric') || 'val_auc';
    let showAll = false;
    let jobs = [];
    const jobInfo = new Map();    // job_id -> JobInfo
    const histories = new Map();  // task_id -> Map(epoch -> value row)
    const configs = new Map();    // task_id -> flat config
    const updated = new Map();    // job_id -> updated_unix_ms seen

    const picker = el('div', {class: 'picker', id: 'picker'});
    const taskPicker = el('div', {class: 'task-picker', id: 'task-picker'});
    const metricSelect = el('select', {id: 'metric', onchange: (e) => { metric = e.target.value; syncUrl(); draw(); }},
      Object.entries(METRICS).map(([k, v]) => el('option', {value: k}, v)));
    metricSelect.value = metric;
    const chartBox = el('div', {class: 'charts single', id: 'compare-chart'});
    const diffBox = el('div', {id: 'config-diff'});
    const allToggle = el('label', {class: 'small'}, el('input', {type: 'checkbox', id: 'show-all',
      onchange: (e) => { showAll = e.target.checked; drawDiff(); }}), ' show identical keys');
    fill(main,
      el('div', {class: 'page-head'}, el('h1', {}, 'Compare'),
         el('span', {class: 'muted'}, 'jobs and tasks on one epoch axis, configs diffed key by key')),
      el('section', {class: 'card'}, el('h2', {}, 'Jobs'), picker, el('h2', {}, 'Tasks'), taskPicker),
      el('section', {class: 'card'}, el('div', {class: 'section-head'}, el('h2', {}, 'Curves'), el('div', {class: 'spacer'}),
         el('label', {class: 'small'}, 'metric ', metricSelect)), chartBox),
      el('section', {class: 'card'}, el('div', {class: 'section-head'}, el('h2', {}, 'Config diff'), el('div', {class: 'spacer'}),
         allToggle), diffBox));

    function syncUrl() {
      const q = new URLSearchParams();
      if (chosenJobs.size) q.set('jobs', [...chosenJobs].join(','));
      // Only a choice made by hand: the default (the first DEFAULT_TASKS of the chosen jobs) is
      // what the link without `tasks` gives again, and a sweep's every task id made a URL longer
      // than the server reads (a reload or a shared link got 400).
      if (tasksByHand) q.set('tasks', [...chosenTasks].join(','));
      if (metric !== 'val_auc') q.set('metric', metric);
      history.replaceState(null, '', `/compare?${q.toString()}`);
    }

    function drawPicker() {
      // The 30 newest jobs, and every chosen one (so that it can be unchecked).
      const shown = jobs.filter((j, i) => i < 30 || chosenJobs.has(j.job_id));
      for (const id of chosenJobs) {
        if (!shown.some((j) => j.job_id === id) && jobInfo.has(id)) shown.push(jobInfo.get(id));
      }
      // The same boxes while nothing shown changed: a box swapped between a click's press and
      // release loses the click (and the keyboard focus).
      const key = JSON.stringify([shown.map((j) => [j.job_id, j.name, j.state]), [...chosenJobs]]);
      if (key === pickerKey) return;
      pickerKey = key;
      fill(picker, ...shown.map((j) => {
        const box = el('input', {type: 'checkbox', value: j.job_id, onchange: (e) => {
          if (e.target.checked) chosenJobs.add(j.job_id); else chosenJobs.delete(j.job_id);
          syncUrl();
          loadJobs();
        }});
        box.checked = chosenJobs.has(j.job_id);
        return el('label', {class: 'pick'}, box, el('span', {class: 'mono'}, j.job_id), ' ',
                  j.name ? el('span', {}, j.name) : null, badge(j.state));
      }));
      if (!jobs.length) fill(picker, el('p', {class: 'muted'}, 'No jobs yet.'));
    }

    // The chosen jobs' tasks in turn (job 1's first, job 2's first, ..., job 1's second, ...),
    // DEFAULT_TASKS at most.
    function defaultTasks() {
      const queues = [...chosenJobs].filter((id) => jobInfo.has(id)).map((id) => [...(jobInfo.get(id).tasks || [])]);
      const picked = [];
      while (picked.length < DEFAULT_TASKS && queues.some((q) => q.length)) {
        for (const q of queues) if (q.length && picked.length < DEFAULT_TASKS) picked.push(q.shift());
      }
      return picked;
    }

    function allTasks() {
      const out = [];
      for (const id of chosenJobs) for (const t of (jobInfo.get(id) || {}).tasks || []) out.push(t);
      return out;
    }
    function activeTasks() {
      return allTasks().filter((t) => chosenTasks.has(t.task_id));
    }

    function drawTaskPicker() {
      const tasks = allTasks();
      const note = !tasksByHand && tasks.length > chosenTasks.size
        ? [el('p', {class: 'muted small'}, `The first ${chosenTasks.size} of ${tasks.length} tasks are drawn (more ` +
                                           'curves than colours are unreadable); tick others below.')]
        : [];
      fill(taskPicker, ...note, ...tasks.map((t) => {
        const box = el('input', {type: 'checkbox', value: t.task_id, onchange: (e) => {
          if (e.target.checked) chosenTasks.add(t.task_id); else chosenTasks.delete(t.task_id);
          tasksByHand = true;
          syncUrl();
          // A task ticked now: its rows (the page holds only the chosen tasks' history).
          if (e.target.checked) loadHistory(t.job_id, [t.task_id]).then(draw).catch((err) => flash(err.message));
          loadTasks();
        }});
        box.checked = chosenTasks.has(t.task_id);
        return el('label', {class: 'pick'}, box, el('span', {class: 'mono'}, t.task_id), badge(t.state));
      }));
      if (!tasks.length) fill(taskPicker, el('p', {class: 'muted'}, 'Pick one or more jobs above.'));
    }

    let graph = null;
    function draw() {
      const tasks = activeTasks();
      const series = tasks.map((t) => {
        const h = histories.get(t.task_id) || new Map();
        return new Map([...h.entries()].map(([e, m]) => [e, num(m[metric])]));
      });
      const rows = mergeSeries(series);
      const key = `${metric}|${tasks.map((t) => t.task_id).join('|')}`;
      if (!graph || graph.key !== key) {
        if (graph) graph.dispose();
        fill(chartBox);
        graph = chart(chartBox, METRICS[metric], ['epoch', ...tasks.map((t) => t.task_id)], rows, {lr: metric === 'lr'});
        graph.key = key;
      } else {
        graph.update(rows, null);
      }
      if (!tasks.length) fill(chartBox, el('p', {class: 'muted'}, 'Pick tasks to overlay their curves.'));
    }

    function drawDiff() {
      const tasks = activeTasks().filter((t) => configs.has(t.task_id));
      if (tasks.length < 2) {
        fill(diffBox, el('p', {class: 'muted'}, 'Pick two or more tasks to diff their configs.'));
        return;
      }
      const keys = new Set();
      for (const t of tasks) for (const k of Object.keys(configs.get(t.task_id))) keys.add(k);
      const rows = [];
      let differing = 0;
      for (const key of [...keys].sort()) {
        const values = tasks.map((t) => configs.get(t.task_id)[key]);
        const differs = values.some((v) => v !== values[0]);
        if (differs) differing++;
        if (!differs && !showAll) continue;
        rows.push(el('tr', {class: differs ? 'differs' : ''}, el('td', {class: 'mono key'}, key),
          values.map((v) => el('td', {class: 'mono'}, v === undefined ? el('span', {class: 'muted'}, '(absent)') : v))));
      }
      fill(diffBox,
        el('p', {class: 'small muted', id: 'diff-count'}, `${differing} of ${keys.size} keys differ`),
        el('div', {class: 'table-scroll'}, el('table', {class: 'table diff', id: 'diff-table'},
          el('thead', {}, el('tr', {}, el('th', {}, 'key'), tasks.map((t) => el('th', {class: 'mono'}, t.task_id)))),
          el('tbody', {}, rows))));
    }

    async function loadTasks() {
      const tasks = activeTasks();
      await Promise.all(tasks.filter((t) => !configs.has(t.task_id)).map((t) =>
        api(`/api/jobs/${t.job_id}/tasks/${encodeURIComponent(taskName(t))}/config`)
          .then((c) => configs.set(t.task_id, c.flat)).catch((e) => flash(e.message))));
      draw();
      drawDiff();
    }

    const loading = new Set();  // jobs whose history is being fetched
    let historyCalls = 0;
    const historyCall = new Map();  // task_id -> the call whose rows it shows
    // The chosen tasks' rows of a job (a sweep's every row is tens of MB, and the page asks again
    // at each of the job's updates), or `only` these task ids (one ticked); the whole job's when
    // more are chosen than a URL holds. Calls overlap (a tick during an update's call): a task
    // takes the rows of the latest call made for it, whichever answers last.
    async function loadHistory(jobId, only) {
      const call = ++historyCalls;
      const ids = only || [...chosenTasks].filter((t) => t.startsWith(`${jobId}/`));
      const names = ids.map((t) => t.slice(jobId.length + 1));
      const h = !names.length ? {rows: []}
        : await api(`/api/jobs/${jobId}/history` + (names.length <= HISTORY_TASKS_MAX ? `?tasks=${names.map(encodeURIComponent).join(',')}` : ''));
      const rows = new Map(ids.map((id) => [id, new Map()]));
      for (const row of h.rows || []) {
        if (!rows.has(row.task_id)) rows.set(row.task_id, new Map());
        rows.get(row.task_id).set(row.metrics.epoch, row.metrics);
      }
      for (const [id, epochs] of rows) {
        if ((historyCall.get(id) || 0) > call) continue;
        historyCall.set(id, call);
        histories.set(id, epochs);
      }
    }

    async function loadJobs() {
      try {
        // A job of the link that is gone (deleted, or a typo) is dropped with a note; the others
        // still load.
        const results = await Promise.allSettled([...chosenJobs].map((id) => api(`/api/jobs/${id}?checkpoints=0`)));
        const gone = [];
        const infos = [];
        [...chosenJobs].forEach((id, i) => {
          const r = results[i];
          if (r.status === 'fulfilled') { infos.push(r.value); return; }
          // 404: deleted; 400: not a job id at all (a typo in the link).
          if (r.reason && (r.reason.status === 404 || r.reason.status === 400)) {
            gone.push(id);
            chosenJobs.delete(id);
            for (const t of [...chosenTasks]) if (t.startsWith(`${id}/`)) chosenTasks.delete(t);
            return;
          }
          throw r.reason;
        });
        if (gone.length) {
          syncUrl();
          flash(`left out, no such job: ${gone.join(', ')}`);
        }
        const added = infos.filter((j) => !jobInfo.has(j.job_id));
        infos.forEach((j) => { jobInfo.set(j.job_id, j); updated.set(j.job_id, j.updated_unix_ms); });
        if (!tasksByHand) {
          // At most DEFAULT_TASKS, taken from the chosen jobs in turn (a sweep's hundreds were all
          // fetched and drawn at once; the first job's alone would hide the others).
          chosenTasks = new Set(defaultTasks().map((t) => t.task_id));
        } else {
          // A job added since brings its tasks (not at the page's first load: the link's list holds).
          for (const j of added) if (jobInfo.size > added.length) for (const t of j.tasks || []) chosenTasks.add(t.task_id);
        }
        // A link's task the job does not have (any more) is dropped: the history call refuses it.
        for (const t of [...chosenTasks]) {
          const j = jobInfo.get(t.slice(0, t.indexOf('/')));
          if (j && !(j.tasks || []).some((x) => x.task_id === t)) chosenTasks.delete(t);
        }
        await Promise.all(infos.map((j) => loadHistory(j.job_id)));
        drawTaskPicker();
        await loadTasks();
      } catch (e) { flash(e.message); }
    }

    // One history request per job at a time; a job changed meanwhile (its last event came while
    // the request was out) is looked at again when the request ends.
    function refreshStale() {
      const stale = jobs.filter((j) => chosenJobs.has(j.job_id) && !loading.has(j.job_id) &&
                                       updated.get(j.job_id) !== j.updated_unix_ms);
      if (!stale.length) return;
      stale.forEach((j) => loading.add(j.job_id));
      Promise.all(stale.map((j) => loadHistory(j.job_id).then(() => {
        jobInfo.set(j.job_id, j); updated.set(j.job_id, j.updated_unix_ms);
      }).finally(() => loading.delete(j.job_id)))).then(() => { clearLoadError(); drawTaskPicker(); draw(); refreshStale(); })
        .catch((e) => loadError(`history: ${e.message}; it is read again at the next change`));
    }
    stream('/api/events?topics=jobs', {jobs: (data) => {
      jobs = data.jobs || [];
      drawPicker();
      refreshStale();
    }}, () => { loadJobs(); });
    loadJobs();
  }

  // ---------------------------------------------------------------------------------------------
  // Groups page.

  function renderGroups() {
    const tbody = el('tbody', {id: 'groups-body'});
    const empty = el('p', {class: 'empty muted hidden', id: 'groups-empty'}, 'No worker groups registered. Start one with ',
      el('code', {}, 'mpirun -np N aviary-worker serve --coordinator HOST:PORT'), '.');
    const count = el('div', {class: 'counts'});
    fill(main,
      el('div', {class: 'page-head'}, el('h1', {}, 'Worker groups'), count),
      el('div', {class: 'card'}, el('table', {class: 'table', id: 'groups-table'},
        el('thead', {}, el('tr', {}, ['Group', 'Hosts', 'Ranks', 'Backend', 'Devices', 'Current task', 'Epoch',
                                      'Samples/s', 'GPU memory', 'Last heartbeat', 'Registered']
          .map((h, i) => el('th', {class: i >= 6 ? 'num' : ''}, h)))),
        tbody), empty));
    function render(data) {
      const groups = data.groups || [];
      empty.classList.toggle('hidden', groups.length > 0);
      const ranks = groups.reduce((n, g) => n + (g.world_size || 0), 0);
      fill(count, el('span', {class: 'count'}, `${groups.length} groups`), el('span', {class: 'count'}, `${ranks} ranks`),
                            el('span', {class: 'count state-running'}, `${groups.filter((g) => g.task_id).length} busy`));
      patchRows(tbody, groups.map((g) => {
        const jobId = g.task_id ? g.task_id.split('/')[0] : '';
        const heartbeat = num(g.last_heartbeat_age_s);
        return el('tr', {dataset: {key: g.group_id, group: g.group_id}},
          el('td', {class: 'mono'}, g.group_id),
          el('td', {}, [...new Set(g.hosts)].join(', ') || '\u2014'),
          el('td', {}, String(g.world_size)),
          el('td', {}, g.backend || '\u2014'),
          el('td', {class: 'small'}, summarizeDevices(g.devices)),
          el('td', {}, g.task_id ? el('a', {class: 'mono', href: `/jobs/${jobId}#task=${encodeURIComponent(g.task_id.split('/')[1])}`}, g.task_id)
                                 : el('span', {class: 'muted'}, 'idle')),
          el('td', {class: 'num'}, g.task_id ? `${g.epoch || 0}/${(g.epochs || 0) - 1}` : '\u2014'),
          el('td', {class: 'num'}, fmt(g.samples_per_s, 1)),
          g.gpu_memory_bytes === null || g.gpu_memory_bytes === undefined
            ? el('td', {class: 'num muted', title: 'this group reports no device memory (a CPU group, or none yet)'},
                 'not reported')
            : el('td', {class: 'num'}, `${(g.gpu_memory_bytes / 2 ** 30).toFixed(1)} GiB`),
          el('td', {class: `num ${heartbeat > 10 ? 'warn' : 'ok'}`}, `${duration(heartbeat)} ago`),
          el('td', {class: 'num'}, `${age(g.registered_unix_ms)} ago`));
      }));
    }
    function summarizeDevices(devices) {
      const counts = {};
      for (const d of devices || []) counts[d] = (counts[d] || 0) + 1;
      return Object.entries(counts).map(([d, n]) => (n > 1 ? `${n}\u00d7 ${d}` : d)).join(', ') || '\u2014';
    }
    const load = () => api('/api/groups').then((g) => { clearLoadError(); render(g); }).catch((e) => loadError(e.message));
    stream('/api/events?topics=groups', {groups: render}, load);
  }

  // ---------------------------------------------------------------------------------------------

  async function start() {
    // Log out sends the console's header (the server refuses a POST without it: a form on
    // another site could post there).
    for (const form of document.querySelectorAll('form[action="/logout"]')) {
      form.addEventListener('submit', (e) => {
        e.preventDefault();
        fetch('/logout', {method: 'POST', credentials: 'same-origin', headers: {'X-Aviary-Console': '1'}})
          .finally(() => { location.href = '/login'; });
      });
    }
    for (const a of document.querySelectorAll('[data-nav]')) {
      if (a.dataset.nav === page || (page === 'job' && a.dataset.nav === 'jobs')) a.classList.add('active');
    }
    try {
      session = await api('/api/session');
      document.getElementById('role').textContent = session.auth ? `${session.role} token` : 'no auth';
      if (session.grafana_url) {
        const link = document.getElementById('grafana-link');
        link.href = session.grafana_url;
        link.classList.remove('hidden');
      }
    } catch (e) { /* the page's own calls say what is wrong */ }
    ({jobs: renderJobs, job: renderJob, compare: renderCompare, groups: renderGroups}[page] || renderJobs)();
  }
  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
