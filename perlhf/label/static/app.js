"use strict";
// The labelling page. Everything from the server goes on the page through textContent, never innerHTML:
// prompts and responses are model output and may contain markup or script, which must show as text.

const $ = (id) => document.getElementById(id);
const CHOICE_NAMES = {left: "A is better", right: "B is better", tie: "Tie", both_bad: "Both bad"};
const KEYS = {"1": "left", "2": "right", "3": "tie", "4": "both_bad"};
let csrf = "";
let current = null;
let busy = false;

async function api(path, body) {
  const options = {credentials: "same-origin", headers: {}};
  if (body !== undefined) {
    options.method = "POST";
    options.headers = {"Content-Type": "application/json", "X-CSRF-Token": csrf};
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error || `${response.status} ${response.statusText}`);
  return data;
}

function say(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.className = isError ? "error" : "";
}

function showPrompt(prompt) {
  const box = $("prompt");
  box.replaceChildren();
  if (typeof prompt === "string") {
    box.textContent = prompt;
    return;
  }
  for (const message of prompt) {  // a chat: one block per turn
    const turn = document.createElement("div");
    turn.className = "turn";
    const role = document.createElement("div");
    role.className = "role";
    role.textContent = String(message.role);
    const content = document.createElement("div");
    content.textContent = typeof message.content === "string" ? message.content : JSON.stringify(message.content);
    turn.append(role, content);
    box.append(turn);
  }
}

function show(state) {
  current = state.pair;
  const {done, total} = state.progress;
  $("progress-text").textContent = `${done} / ${total}`;
  $("progress-bar").max = Math.max(total, 1);
  $("progress-bar").value = done;
  $("undo").disabled = done === 0;
  $("work").hidden = !current;
  $("finished").hidden = !!current;
  for (const button of document.querySelectorAll("[data-choice]")) {
    button.classList.toggle("previous", !!state.previous && state.previous.choice === button.dataset.choice);
  }
  if (!current) return;
  showPrompt(current.prompt);
  $("left").textContent = current.left;
  $("right").textContent = current.right;
  $("comment").value = state.previous ? state.previous.comment : "";
}

async function run(action) {
  if (busy) return;  // one request at a time: a held-down key must not answer twice
  busy = true;
  try {
    await action();
  } catch (error) {
    say(error.message, true);
  } finally {
    busy = false;
  }
}

function choose(choice) {
  if (!current) return;
  run(async () => {
    const pair = current.id;
    show(await api("/api/answer", {pair_id: pair, choice, comment: $("comment").value}));
    say(`Saved “${CHOICE_NAMES[choice]}” for pair ${pair}.`);
  });
}

function signOut() {  // not through run(): signing out must work even while a request is under way
  api("/api/logout", {}).then(() => showSignedOut("To label again, open a new sign-in link."),
                             (error) => say(error.message, true));
}

function undo() {
  run(async () => {
    const state = await api("/api/undo", {});
    show(state);
    say(state.undone ? `Undid your answer to pair ${state.undone}; answer it again.` : "Nothing to undo.");
  });
}

document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const typing = event.target instanceof HTMLTextAreaElement;
  if (typing) {
    if (event.key === "Escape") event.target.blur();
    return;
  }
  if (KEYS[event.key]) {
    event.preventDefault();
    choose(KEYS[event.key]);
  } else if (event.key === "u" || event.key === "U") {
    event.preventDefault();
    undo();
  }
});

document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll("[data-choice]")) {
    button.addEventListener("click", () => choose(button.dataset.choice));
  }
  $("undo").addEventListener("click", undo);
  $("sign-out").addEventListener("click", signOut);
  run(async () => {
    const me = await api("/api/me");
    csrf = me.csrf;
    $("name").textContent = `Labelling as ${me.name}`;
    show(await api("/api/next", {}));  // a POST: serving a pair holds a place for you
  });
});
