// The PgQue dashboard's live refresh, written for this project (no library).
// It polls the page's JSON endpoint (body[data-live-url]) every data-refresh-ms and
// updates the figures in place; with JavaScript off the page is the same, minus the
// refresh. It only ever sets textContent and attributes, never markup.
(function () {
  "use strict";

  var body = document.body;
  var url = body.getAttribute("data-live-url");
  var every = parseInt(body.getAttribute("data-refresh-ms") || "0", 10);
  if (!url || !(every > 0) || !window.fetch) {
    return;
  }
  var status = document.getElementById("live-status");
  var timer = null;
  var polling = false;
  var refreshed = 0;

  function setText(cell, text) {
    // A cell may hold a link around its figure: the figure is the .value inside.
    var target = cell.querySelector(".value") || cell;
    if (target.textContent !== text) {
      target.textContent = text;
      cell.classList.remove("updated");
      // Reading offsetWidth restarts the highlight animation.
      void cell.offsetWidth;
      cell.classList.add("updated");
    }
  }

  function updateCells(container, cells) {
    if (!container || !cells) {
      return;
    }
    Object.keys(cells).forEach(function (field) {
      container.querySelectorAll('[data-field="' + field + '"]').forEach(function (cell) {
        setText(cell, cells[field]);
      });
    });
  }

  function findRow(attribute, name) {
    var rows = document.querySelectorAll("tr[" + attribute + "]");
    for (var i = 0; i < rows.length; i++) {
      if (rows[i].getAttribute(attribute) === name) {
        return rows[i];
      }
    }
    return null;
  }

  function updateBlocked(row, names) {
    var cell = row.querySelector('[data-field="rotation_blocked_by"]');
    if (!cell || !names) {
      return;
    }
    var shown = Array.prototype.map.call(cell.querySelectorAll("mark"), function (m) {
      return m.textContent;
    });
    if (shown.join("\n") === names.join("\n")) {
      return;
    }
    cell.textContent = names.length ? "" : "-";
    names.forEach(function (name) {
      var mark = document.createElement("mark");
      mark.className = "blocking";
      mark.textContent = name;
      cell.appendChild(mark);
      cell.appendChild(document.createTextNode(" "));
    });
  }

  // Returns how many queues or consumers the page has no row for (new since it loaded).
  function apply(data) {
    var unseen = 0;
    if (data.queues) {
      Object.keys(data.queues).forEach(function (name) {
        var row = findRow("data-queue", name);
        if (!row) {
          unseen += 1;
          return;
        }
        var queue = data.queues[name];
        updateCells(row, queue.cells);
        updateBlocked(row, queue.blocked_by);
        var line = row.querySelector('polyline[data-field="sparkline"]');
        if (line && typeof queue.sparkline === "string") {
          line.setAttribute("points", queue.sparkline);
        }
      });
    }
    if (data.queue) {
      updateCells(document.getElementById("queue-figures"), data.queue);
    }
    if (data.consumers) {
      Object.keys(data.consumers).forEach(function (label) {
        var row = findRow("data-consumer", label);
        if (row) {
          updateCells(row, data.consumers[label]);
        } else {
          unseen += 1;
        }
      });
    }
    return unseen;
  }

  function say(text) {
    if (status) {
      status.hidden = false;
      status.textContent = text;
    }
  }

  function poll() {
    timer = null;
    polling = true;
    fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) {
        if (!response.ok) {
          throw new Error("HTTP " + response.status);
        }
        return response.json();
      })
      .then(function (data) {
        var unseen = apply(data);
        refreshed += 1;
        body.setAttribute("data-refreshed", String(refreshed));
        say("live, updated " + new Date().toLocaleTimeString() +
            (unseen ? "; " + unseen + " new since loaded: refresh to see them" : ""));
      })
      .catch(function (error) {
        say("not updating: " + error.message);
      })
      .then(function () {
        polling = false;
        schedule();
      });
  }

  function schedule() {
    // A hidden tab does not poll; it catches up when shown again.
    if (timer === null && !polling && document.visibilityState !== "hidden") {
      timer = window.setTimeout(poll, every);
    }
  }

  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "hidden") {
      if (timer !== null) {
        window.clearTimeout(timer);
        timer = null;
      }
    } else if (timer === null && !polling) {
      poll();
    }
  });

  schedule();
})();
