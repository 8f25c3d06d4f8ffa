// Live status: every element with data-live="<id>" follows that experiment's status until it
// finishes (the API's status poll, with the page's cookie); data-reload reloads the page then.
(function () {
  const terminal = new Set(["succeeded", "failed", "canceled"]);

  async function follow(element) {
    const id = element.dataset.live;
    const response = await fetch(`/experiments/${encodeURIComponent(id)}`, { credentials: "same-origin" });
    if (!response.ok) return;
    const experiment = await response.json();
    const percent = experiment.status === "running" ? ` ${Math.round(experiment.progress * 100)}%` : "";
    element.textContent = experiment.status + percent;
    element.className = `status ${experiment.status}`;
    if (terminal.has(experiment.status)) {
      if (element.dataset.reload) window.location.reload();
      return;
    }
    setTimeout(() => follow(element), 2000);
  }

  document.querySelectorAll("[data-live]").forEach((element) => setTimeout(() => follow(element), 2000));
})();
