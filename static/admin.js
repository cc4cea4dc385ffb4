// chatproxy's operator page: reads /api/admin/overview and /api/admin/keys, and manages keys through
// /api/admin/keys with the page session's CSRF token. Every value goes into the page as text (textContent).
"use strict";

(() => {
  const root = document.getElementById("admin");
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const failure = document.getElementById("failure");
  const keysUrl = root.dataset.keysUrl;
  let spentToday = {};

  function show(message) {
    failure.textContent = message;
    failure.hidden = !message;
  }

  async function call(url, method = "GET", body = undefined) {
    const headers = { "X-CSRF-Token": csrf };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error((data.error && data.error.message) || `HTTP ${response.status}`);
    return data;
  }

  function cell(row, tag, text) {
    const element = document.createElement(tag);
    element.textContent = text;
    row.append(element);
  }

  function money(value) {
    if (value === null || value === undefined) return "—";
    const dollars = Number(value);
    return `$${dollars.toFixed(dollars > 0 && dollars < 0.01 ? 6 : 2)}`;
  }

  async function loadOverview() {
    const data = await call(root.dataset.overviewUrl);
    document.getElementById("spend-today").textContent = money(data.today);
    document.getElementById("spend-month").textContent = money(data.month);
    const caps = document.querySelector("#caps tbody");
    caps.replaceChildren();
    for (const cap of data.caps) {
      const row = document.createElement("tr");
      cell(row, "td", cap.cap);
      cell(row, "td", money(cap.limit_usd));
      cell(row, "td", money(cap.remaining_usd));
      cell(row, "td", cap.resets_at);
      caps.append(row);
    }
    spentToday = Object.fromEntries(data.keys.map((entry) => [entry.key, entry.today_usd]));
    const users = document.getElementById("end-users");
    users.replaceChildren();
    for (const user of data.top_end_users) {
      const item = document.createElement("li");
      item.textContent = `${user.identity}: ${money(user.month_usd)}`;
      users.append(item);
    }
    const errors = document.getElementById("errors");
    errors.replaceChildren();
    const codes = Object.entries(data.errors);
    if (!codes.length) cell(errors, "li", "None.");
    for (const [code, count] of codes) cell(errors, "li", `${code}: ${count}`);
  }

  async function loadKeys() {
    const { data } = await call(keysUrl);
    const body = document.querySelector("#keys tbody");
    const template = document.getElementById("key-row");
    body.replaceChildren();
    for (const key of data) {
      const row = template.content.firstElementChild.cloneNode(true);
      row.dataset.name = key.name;
      row.querySelector(".name").textContent = key.name;
      row.querySelector(".status").textContent = key.status;
      row.querySelector(".owner").textContent = key.owner;
      row.querySelector(".models").textContent = key.models ? key.models.join(", ") : "all";
      row.querySelector(".daily").value = key.daily_budget_usd === null ? "" : Number(key.daily_budget_usd).toString();
      row.querySelector(".monthly").textContent = money(key.monthly_budget_usd);
      row.querySelector(".spent").textContent = money(spentToday[key.name] || 0);
      row.querySelector(".used").textContent = key.last_used_at || "never";
      const revoked = key.status === "revoked";
      row.querySelector(".revoke").disabled = revoked;
      row.querySelector(".save").disabled = revoked;
      row.querySelector(".daily").disabled = revoked;
      row.querySelector(".revoke").addEventListener("click", () => act(() => call(`${keysUrl}/${encodeURIComponent(key.name)}/revoke`, "POST")));
      row.querySelector(".save").addEventListener("click", () => {
        const daily = row.querySelector(".daily").value.trim();
        act(() => call(`${keysUrl}/${encodeURIComponent(key.name)}`, "PATCH", { daily_budget_usd: daily || null }));
      });
      body.append(row);
    }
  }

  async function act(change) {
    try {
      await change();
      show("");
      await loadKeys();
    } catch (error) {
      show(error.message);
    }
  }

  document.getElementById("create-key").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = (id) => document.getElementById(id).value.trim();
    const body = { name: value("new-name") };
    if (value("new-owner")) body.owner = value("new-owner");
    if (value("new-models")) body.models = value("new-models").split(",").map((m) => m.trim()).filter(Boolean);
    if (value("new-daily")) body.daily_budget_usd = value("new-daily");
    if (value("new-monthly")) body.monthly_budget_usd = value("new-monthly");
    act(async () => {
      const made = await call(keysUrl, "POST", body);
      const shown = document.getElementById("new-token");
      shown.textContent = `Token for ${made.key.name} (shown once): ${made.token}`;
      shown.hidden = false;
      event.target.reset();
    });
  });

  (async () => {
    try {
      await loadOverview();
      await loadKeys();
    } catch (error) {
      show(error.message);
    }
  })();
})();
