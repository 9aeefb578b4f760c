// starlora annotate: the page's script. Every text from the run (prompts, drafts, ids,
// errors) goes into the page through textContent, never as markup.
"use strict";
(() => {
  const token = new URLSearchParams(location.search).get("token") || "";
  const $ = (id) => document.getElementById(id);
  const answer = $("answer");
  let queries = [];
  let index = 0;
  let busy = false;
  const edits = new Map();  // id -> text typed but not saved

  async function api(path, body) {
    const init = { headers: { Authorization: "Bearer " + token }, cache: "no-store" };
    if (body !== undefined) {
      init.method = "POST";
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    let data = {};
    try { data = await response.json(); } catch (e) { data = { error: response.statusText }; }
    if (!response.ok) {
      const error = new Error(data.error || ("HTTP " + response.status));
      error.status = response.status;
      error.data = data;
      throw error;
    }
    return data;
  }

  function say(text, kind) {
    $("status").textContent = text;
    $("status").className = kind || "";
  }

  function progress(answered, total) {
    $("progress-text").textContent = answered + " of " + total + " answered";
    $("progress-bar").max = Math.max(total, 1);
    $("progress-bar").value = answered;
    $("done").hidden = !(total === 0 || answered === total);
    $("main").hidden = total === 0;
    $("done-text").textContent = total === 0
      ? "Nothing waits for answers in this run directory: the run has gone on, or it has " +
        "not paused for answers."
      : "All " + total + " queries are answered. You can still change them until the run goes on.";
    $("continue-label").textContent = total === 0 ? "If the run is not running, continue it:"
      : "Continue the run:";
  }

  function answered() { return queries.filter((q) => q.answer !== null).length; }

  function renderList() {
    const list = $("list");
    list.replaceChildren();
    queries.forEach((q, i) => {
      const li = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.setAttribute("aria-current", i === index ? "true" : "false");
      button.title = q.question || q.id;
      const mark = document.createElement("span");
      mark.className = "mark";
      mark.textContent = q.answer !== null ? "✓" : "";
      mark.setAttribute("aria-label", q.answer !== null ? "saved" : "not answered");
      const text = document.createElement("span");
      text.className = "q";
      text.textContent = q.question || q.id;
      const u = document.createElement("span");
      u.className = "u";
      u.textContent = q.uncertainty === null ? "–" : Number(q.uncertainty).toFixed(3);
      button.append(mark, text, u);
      button.addEventListener("click", () => show(i));
      li.append(button);
      list.append(li);
    });
  }

  function keepEdit() {
    const q = queries[index];
    if (!q) return;
    const saved = q.answer !== null ? q.answer : (q.draft || "");
    if (answer.value !== saved) edits.set(q.id, answer.value); else edits.delete(q.id);
  }

  function note(q) {
    $("answer-note").textContent = edits.has(q.id) ? "(edited, not saved)"
      : q.answer !== null ? "(saved)" : "(the model's draft: edit it, then save)";
  }

  function show(i) {
    keepEdit();
    index = i;
    const q = queries[i];
    $("current").hidden = !q;
    renderList();
    if (!q) return;
    $("title").textContent = "Query " + (i + 1) + " of " + queries.length;
    $("meta").textContent = "id " + q.id + " · uncertainty " +
      (q.uncertainty === null ? "– (drawn at random)" : Number(q.uncertainty).toFixed(4));
    $("prompt").textContent = q.prompt || "";
    answer.value = edits.has(q.id) ? edits.get(q.id)
      : (q.answer !== null ? q.answer : (q.draft || ""));
    note(q);
    answer.focus();
    answer.setSelectionRange(answer.value.length, answer.value.length);
    say("");
  }

  function nextOpen(from) {  // the next unanswered query after `from`, else the next one
    for (let k = 1; k <= queries.length; k++) {
      const j = (from + k) % queries.length;
      if (queries[j].answer === null && j !== from) return j;
    }
    return (from + 1) % queries.length;
  }

  async function load(keepId) {
    const data = await api("api/queries");
    queries = data.queries;
    $("run").textContent = data.run_dir + (data.round === null ? "" : " · query for round " + data.round);
    $("continue").textContent = data.continue;
    progress(data.answered, data.total);
    let i = queries.findIndex((q) => q.id === keepId);
    if (i < 0) i = queries.findIndex((q) => q.answer === null);
    index = -1;
    show(Math.max(i, 0));
  }

  // One save at a time. A save may wait (up to 10 s, for the run's lock) while the labeller
  // types on or opens another query: what the page shows then is theirs, so it moves on only
  // if they are still on the saved query with exactly the text sent.
  async function save() {
    const q = queries[index];
    if (!q) return;
    if (busy) {
      say("Not saved: a save is in progress (it may wait for the run's lock); save this " +
          "once it is done.", "bad");
      return;
    }
    busy = true;
    const sent = answer.value;
    say("saving…");
    try {
      // `previous_sha256`: the digest (the API's) of the saved answer this page knows, not
      // the answer itself, which could double the body; another one saved meanwhile is a 409
      const saved = await api("api/labels",
        { id: q.id, answer: sent, previous_sha256: q.answer_sha256 });
      const here = queries[index] === q && answer.value === sent;
      keepEdit();  // the box as it is now, against the saved answer it was shown with
      q.answer = saved.answer;
      q.answer_sha256 = saved.answer_sha256;
      if (here || edits.get(q.id) === sent || edits.get(q.id) === q.answer) edits.delete(q.id);
      progress(saved.answered, saved.total);
      const all = saved.answered === saved.total;
      if (here) {
        index = -1;  // nothing to keep: the text area holds what was saved
        show(all ? queries.indexOf(q) : nextOpen(queries.indexOf(q)));
        say("Saved the answer to " + q.id + (all ? ". Every query is answered." : "."), "ok");
      } else {  // stay where the labeller is, with what they typed
        renderList();
        note(queries[index]);
        say("Saved the answer to " + q.id + " as sent." + (edits.has(queries[index].id)
          ? " The text in the box is not saved yet." : ""), "ok");
      }
    } catch (e) {
      if (e.status === 409) {  // keep the labeller's text; show theirs
        const here = queries[index] === q;
        if (here) edits.set(q.id, answer.value); else if (!edits.has(q.id)) edits.set(q.id, sent);
        q.answer = e.data.current;
        q.answer_sha256 = e.data.current_sha256;
        progress(answered(), queries.length);
        renderList();
        if (here) $("answer-note").textContent = "(yours, not saved)";
        say("Not saved: someone else saved " + JSON.stringify(q.answer) + " to " + q.id +
            " meanwhile. " + (here ? "Your answer is still in the box" : "Your answer is kept " +
            "on " + q.id) + ": Save again to replace theirs.", "bad");
        return;
      }
      say("Not saved: " + (e.status === 413 ? "the answer is too long (" + e.message +
        "): a save carries at most about 65,000 characters of plain text" : e.message), "bad");
      if (e.message.startsWith("the run has gone on")) {
        await load().catch(() => {});
        say("Not saved: " + e.message, "bad");
        $("notice").textContent = "Your last answer was not saved: " + e.message;
      }
    } finally {
      busy = false;
    }
  }

  $("save").addEventListener("click", save);
  $("skip").addEventListener("click", () => queries.length && show(nextOpen(index)));
  $("prev").addEventListener("click",
    () => queries.length && show((index - 1 + queries.length) % queries.length));
  $("draft").addEventListener("click", () => {
    const q = queries[index];
    if (q) { answer.value = q.draft || ""; answer.focus(); }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); save(); }
    else if (e.altKey && e.key === "ArrowDown") { e.preventDefault(); $("skip").click(); }
    else if (e.altKey && e.key === "ArrowUp") { e.preventDefault(); $("prev").click(); }
  });
  load().catch((e) => {
    $("progress-text").textContent = "";
    $("notice").textContent = "Could not load the queries: " + e.message;
    $("done-text").textContent = "";
    $("continue-line").hidden = true;
    $("done").className = "banner error";
    $("done").hidden = false;
    $("main").hidden = true;
  });
})();
