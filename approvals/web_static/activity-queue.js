// The Activity Queue in the browser: live updates over server-sent events and the
// review dialog. Progressive: every link and form works without this file.
(() => {
  "use strict";
  const dialog = document.getElementById("review-dialog");
  const liveStatus = document.getElementById("live-status");
  const badge = document.getElementById("pending-badge");
  let opener = null;

  function say(text) {
    if (liveStatus) liveStatus.textContent = text;
  }

  function setBadge(count) {
    if (!badge || count === undefined) return;
    badge.textContent = count;
    badge.setAttribute("aria-label", count + " pending");
  }

  // Re-fetch the queue's table (with the page's filters) and the pending badge.
  async function refresh(announce) {
    const results = document.getElementById("queue-results");
    const url = results ? "/queue" + location.search : "/queue?status=pending";
    let response;
    try {
      response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
    } catch (error) {
      return;
    }
    if (response.status === 401) {
      location.assign("/signin");
      return;
    }
    if (!response.ok) return;
    const template = document.createElement("template");
    template.innerHTML = await response.text();
    const fresh = template.content.getElementById("queue-results");
    if (!fresh) return;
    setBadge(fresh.dataset.pending);
    if (results) {
      results.replaceWith(fresh);
      if (announce) say("Queue updated at " + new Date().toLocaleTimeString() + ".");
    }
  }

  if (badge && window.EventSource) {
    const source = new EventSource("/events");
    let timer = 0;
    let dropped = false;
    source.addEventListener("open", () => {
      // Changes between the page's rendering and this moment were not streamed: re-fetch once.
      document.documentElement.dataset.live = "connected";
      if (dropped) say("Live updates resumed.");
      dropped = false;
      refresh(false);
    });
    source.addEventListener("change", () => {
      clearTimeout(timer);
      timer = setTimeout(() => refresh(true), 100);
    });
    source.addEventListener("error", () => {
      document.documentElement.dataset.live = "reconnecting";
      dropped = true;
      say("Live updates paused; reconnecting…");
    });
    setInterval(() => refresh(false), 30000); // keeps "ago" and "time left" current
  }

  // The review dialog: the same page as /requests/ID, fetched into a <dialog>.
  async function openReview(link) {
    const url = new URL(link.href);
    url.searchParams.set("fragment", "1");
    if (!url.searchParams.has("next")) url.searchParams.set("next", location.pathname + location.search);
    let response;
    try {
      response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
    } catch (error) {
      location.assign(link.href);
      return;
    }
    if (response.status === 401) {
      location.assign("/signin");
      return;
    }
    dialog.innerHTML = await response.text();
    opener = link;
    dialog.showModal();
    const first = dialog.querySelector("textarea, .buttons button, .buttons a");
    if (first) first.focus();
  }

  if (dialog && typeof dialog.showModal === "function") {
    document.addEventListener("click", (event) => {
      if (!(event.target instanceof Element)) return;
      const link = event.target.closest("a[data-review]");
      if (link && event.button === 0 && !event.ctrlKey && !event.metaKey && !event.shiftKey) {
        event.preventDefault();
        openReview(link);
        return;
      }
      if (dialog.open && event.target.closest("[data-close]")) {
        event.preventDefault();
        dialog.close();
      }
    });
    dialog.addEventListener("click", (event) => {
      if (event.target === dialog) dialog.close(); // a click on the backdrop
    });
    dialog.addEventListener("close", () => {
      dialog.replaceChildren();
      // Focus goes back to the link that opened the dialog, or to its twin if a live update
      // replaced the table meanwhile.
      let back = opener;
      if (back && !back.isConnected) {
        back = Array.from(document.querySelectorAll("a[data-review]")).find((a) =>
          a.getAttribute("href") === opener.getAttribute("href") && a.textContent === opener.textContent);
      }
      if (back) back.focus();
      opener = null;
    });
  }
})();
