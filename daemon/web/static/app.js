// deployd's dashboard: the live log of a running deploy (server-sent events).
// No framework, no inline script (the pages' CSP is default-src 'self').
"use strict";

(function () {
  var log = document.getElementById("log");
  if (!log || !log.dataset.events || !window.EventSource) {
    return;
  }
  var source = new EventSource(log.dataset.events);
  var live = document.getElementById("live");
  var state = document.getElementById("state");
  var step = document.getElementById("step");

  function nearBottom() {
    return window.innerHeight + window.scrollY >= document.body.scrollHeight - 80;
  }

  function lastId() {
    var last = log.lastElementChild;
    return last ? Number(last.dataset.lineId) : 0;
  }

  source.addEventListener("line", function (event) {
    var row = JSON.parse(event.data);
    if (row.id <= lastId()) {
      return; // a reconnect may repeat a line the page has
    }
    var follow = nearBottom();
    var span = document.createElement("span");
    span.className = "line";
    span.dataset.lineId = String(row.id);
    if (row.step) {
      span.dataset.step = row.step;
    }
    span.textContent = row.line; // text, never markup
    log.appendChild(span);
    if (follow) {
      window.scrollTo(0, document.body.scrollHeight);
    }
  });

  source.addEventListener("deploy", function (event) {
    var rec = JSON.parse(event.data);
    if (state) {
      state.textContent = rec.state.replace(/_/g, " ");
      state.dataset.state = rec.state;
      state.className = "state state-" + rec.state;
    }
    var running = rec.state === "queued" || rec.state === "running";
    if (step) {
      step.textContent = running && rec.step ? "in " + rec.step : "";
    }
    var cancel = document.getElementById("cancel");
    if (cancel && !running) {
      cancel.remove(); // nothing left to cancel
    }
    (rec.steps || []).forEach(function (s) {
      var bar = document.querySelector('.step-bar[data-step="' + s.name + '"]');
      if (bar) {
        bar.dataset.state = s.state;
        bar.className = "step-bar step-" + s.state;
      }
    });
  });

  source.addEventListener("end", function () {
    source.close();
    if (live) {
      live.textContent = "ended";
      live.className = "live ended";
    }
  });
})();
