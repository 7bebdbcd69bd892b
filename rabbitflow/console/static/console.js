// rabbitflow console: refresh the queue table in place, select-all, render the diagram.
"use strict";

function refreshQueues(status) {
  const target = document.getElementById(status.dataset.target);
  fetch(status.dataset.refresh, { credentials: "same-origin", cache: "no-store" })
    .then((response) => {
      if (!response.ok) throw new Error("HTTP " + response.status);
      return response.text();
    })
    .then((html) => {
      target.innerHTML = html;
      status.textContent = "updated " + new Date().toISOString().slice(0, 19).replace("T", " ") + "Z · refreshes every 5 s";
      status.classList.remove("stale");
    })
    .catch((error) => {
      status.textContent = "refresh failed (" + error.message + "), retrying";
      status.classList.add("stale");
    });
}

document.addEventListener("DOMContentLoaded", () => {
  const status = document.querySelector("[data-refresh]");
  if (status) setInterval(() => refreshQueues(status), 5000);

  const all = document.getElementById("select-all");
  if (all) {
    all.addEventListener("change", () => {
      document.querySelectorAll('#messages input[name="key"]').forEach((box) => { box.checked = all.checked; });
    });
  }

  if (window.mermaid && document.querySelector(".mermaid")) {
    window.mermaid.initialize({ startOnLoad: false, securityLevel: "strict", theme: "neutral" });
    window.mermaid.run({ querySelector: ".mermaid" });
  }
});
