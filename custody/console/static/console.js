// The console's own script (no framework, no build): passkeys through the browser's
// WebAuthn JSON helpers, the LTV bars' widths, and fragments that refresh by polling.
"use strict";

function setStatus(text) {
  const el = document.getElementById("status");
  if (el) el.textContent = text;
}

async function postJson(url, body) {
  const response = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/json", "Accept": "application/json" },
    body: JSON.stringify(body || {}),
    credentials: "same-origin",
  });
  const data = await response.json();
  if (!response.ok) throw new Error(data.message || "refused");
  return data;
}

async function register(button) {
  const base = "/console/invite/" + encodeURIComponent(button.dataset.token);
  const options = await postJson(base + "/options");
  const credential = await navigator.credentials.create({
    publicKey: PublicKeyCredential.parseCreationOptionsFromJSON(options),
  });
  const done = await postJson(base + "/register", credential.toJSON());
  window.location.assign(done.redirect);
}

async function signIn() {
  const options = await postJson("/console/sign-in/options");
  const credential = await navigator.credentials.get({
    publicKey: PublicKeyCredential.parseRequestOptionsFromJSON(options),
  });
  const done = await postJson("/console/sign-in", credential.toJSON());
  window.location.assign(done.redirect);
}

function wirePasskeys() {
  document.querySelectorAll("[data-passkey]").forEach((button) => {
    button.addEventListener("click", async () => {
      button.disabled = true;
      setStatus("Waiting for your passkey…");
      try {
        if (button.dataset.passkey === "register") await register(button);
        else await signIn();
      } catch (error) {
        setStatus("Refused: " + error.message);
        button.disabled = false;
      }
    });
  });
}

// The approval: the options come from the console (challenge = the digest of the bank's
// signer's statement for this request), the passkey signs, the assertion is posted with
// the session's CSRF token; the page then follows the request by its polling.
async function approve(button) {
  const url = button.dataset.approve;
  const response = await fetch(url, {
    headers: { "Accept": "application/json" },
    credentials: "same-origin",
  });
  const data = await response.json();
  if (!response.ok) throw new Error(data.message || "refused");
  const digest = document.getElementById("approval-digest");
  if (digest && digest.textContent !== data.digest) {
    throw new Error("the statement changed since this page was shown: reload it");
  }
  const credential = await navigator.credentials.get({
    publicKey: PublicKeyCredential.parseRequestOptionsFromJSON(data.options),
  });
  const posted = await fetch(url, {
    method: "POST",
    headers: {
      "Content-Type": "application/json",
      "Accept": "application/json",
      "X-CSRF-Token": button.dataset.csrf,
    },
    body: JSON.stringify(credential.toJSON()),
    credentials: "same-origin",
  });
  const done = await posted.json();
  if (!posted.ok) throw new Error(done.message || "refused");
  setStatus("Approved by " + done.person + ": the statement is " + done.state +
    (done.outcome ? " (" + done.outcome + ")" : ""));
  button.dataset.done = done.state;
}

function wireApproval() {
  const button = document.getElementById("approve");
  if (!button) return;
  button.addEventListener("click", async () => {
    button.disabled = true;
    setStatus("Waiting for your passkey…");
    try {
      await approve(button);
    } catch (error) {
      setStatus("Refused: " + error.message);
      button.disabled = false;
    }
  });
}

function drawBars(root) {
  root.querySelectorAll("[data-width]").forEach((el) => {
    el.style.width = el.dataset.width + "%";
  });
  root.querySelectorAll("[data-left]").forEach((el) => {
    el.style.left = el.dataset.left + "%";
  });
}

function poll(el) {
  const interval = parseInt(el.dataset.interval || "2000", 10);
  const tick = async () => {
    try {
      const response = await fetch(el.dataset.poll, {
        headers: { "X-Console-Poll": "1" },
        credentials: "same-origin",
      });
      if (response.ok) {
        el.innerHTML = await response.text();
        drawBars(el);
        el.dataset.refreshed = String(Date.now());
      }
    } finally {
      window.setTimeout(tick, interval);
    }
  };
  window.setTimeout(tick, interval);
}

document.addEventListener("DOMContentLoaded", () => {
  wirePasskeys();
  wireApproval();
  drawBars(document);
  document.querySelectorAll("[data-poll]").forEach(poll);
});
