/* chatproxy chat page: streams answers from POST /api/chat (SSE) into the transcript, keeps
 * conversations in this browser (static/conversations.js) and renders answers as markdown
 * (static/markdown.js).
 *
 * Safety rule for this file: text from the model, the user, the server or storage is only ever
 * placed with textContent / createTextNode (or through ChatMarkdown, which follows the same rule).
 * Nothing here parses HTML.
 */
(function () {
  "use strict";

  var MAX_COUNTDOWN = 600; // seconds: a longer Retry-After (a daily budget) is stated, not counted down

  // ---------------------------------------------------------------- SSE parsing

  /** An incremental SSE parser: push decoded text, get one callback per complete event's data. */
  function createSSEParser(onData) {
    var pending = ""; // raw text not yet line-normalised (may end in a lone "\r")
    var buffer = ""; // normalised text ("\n" line ends) holding the unfinished event

    function dispatch(block) {
      var data = [];
      block.split("\n").forEach(function (line) {
        if (line === "" || line.charAt(0) === ":") return; // comment: a keep-alive ping
        var colon = line.indexOf(":");
        var field = colon === -1 ? line : line.slice(0, colon);
        var value = colon === -1 ? "" : line.slice(colon + 1);
        if (value.charAt(0) === " ") value = value.slice(1);
        if (field === "data") data.push(value);
      });
      if (data.length) onData(data.join("\n"));
    }

    return {
      push: function (text) {
        pending += text;
        // A "\r" at the very end may be the first half of "\r\n": keep it for the next read.
        var cut = pending.charAt(pending.length - 1) === "\r" ? pending.length - 1 : pending.length;
        buffer += pending.slice(0, cut).replace(/\r\n?/g, "\n");
        pending = pending.slice(cut);
        var boundary;
        while ((boundary = buffer.indexOf("\n\n")) !== -1) {
          var block = buffer.slice(0, boundary);
          buffer = buffer.slice(boundary + 2);
          dispatch(block);
        }
      },
    };
  }

  // ---------------------------------------------------------------- errors in plain words

  function plural(n, word) {
    return n + " " + word + (n === 1 ? "" : "s");
  }

  /** Seconds from a Retry-After header (delta-seconds or an HTTP date), or null. */
  function retryAfterSeconds(value) {
    if (!value) return null;
    var trimmed = value.trim();
    if (/^\d+(\.\d+)?$/.test(trimmed)) return Math.max(1, Math.ceil(parseFloat(trimmed)));
    var when = Date.parse(trimmed);
    if (isNaN(when)) return null;
    return Math.max(1, Math.ceil((when - Date.now()) / 1000));
  }

  /** What to tell the user for an error code from the server. A countdown, if any, is shown apart. */
  function describeError(code, message, retryAfter) {
    code = String(code || "");
    message = typeof message === "string" ? message.trim() : "";
    // Our own refusals: the server's message says which limit and when it resets.
    if (code === "rate_limited") return message || "Too many requests.";
    if (code === "budget_exceeded") return message || "The spending limit has been reached.";
    if (code.indexOf("upstream_") === 0) {
      return retryAfter && retryAfter <= MAX_COUNTDOWN ? "The model provider is having trouble."
        : "The model provider is having trouble — try again later.";
    }
    return message || "Something went wrong. Try again.";
  }

  /** Read a non-2xx response as the error contract: {text, retryAfter}. */
  function errorFromResponse(response) {
    var retryAfter = retryAfterSeconds(response.headers.get("Retry-After"));
    return response
      .json()
      .then(function (body) {
        var error = body && body.error;
        if (!error || typeof error !== "object") throw new Error("not the error contract");
        return { text: describeError(error.code, error.message, retryAfter), retryAfter: retryAfter };
      })
      .catch(function () {
        var text = response.status === 429 ? describeError("rate_limited", "", retryAfter)
          : response.status >= 500 ? "The server could not answer (HTTP " + response.status + "). Try again later."
            : "The request failed (HTTP " + response.status + ").";
        return { text: text, retryAfter: retryAfter };
      });
  }

  function formatWait(seconds) {
    if (seconds < 60) return plural(seconds, "second");
    var minutes = Math.floor(seconds / 60);
    var rest = seconds % 60;
    return plural(minutes, "minute") + (rest ? " " + plural(rest, "second") : "");
  }

  // ---------------------------------------------------------------- what the server is sent

  /**
   * A question as the server takes it: its text, or text and image parts when it has pictures and the
   * model sees them (for a model that does not, the pictures are left out and said to be).
   */
  function questionContent(m, sees) {
    var images = m.images || [];
    if (!images.length) return m.content;
    if (!sees) return m.content.trim() ? m.content : "[an image the selected model cannot see]";
    var parts = m.content.trim() ? [{ type: "text", text: m.content }] : [];
    images.forEach(function (url) { parts.push({ type: "image_url", image_url: { url: url } }); });
    return parts;
  }

  /** The characters of a message's text, and of its pictures' data URLs. */
  function textOf(content) {
    if (typeof content === "string") return content;
    return content.map(function (part) { return part.type === "text" ? part.text : ""; }).join("");
  }

  function imagesOf(content) {
    return typeof content === "string" ? [] : content.filter(function (part) { return part.type === "image_url"; });
  }

  /**
   * The turns the model should see: answered questions with their answers, then the new question.
   * The one place that shapes messages for the server.
   */
  function turnsForServer(messages, sees) {
    var out = [];
    for (var i = 0; i < messages.length; i++) {
      var m = messages[i];
      if (m.role !== "user") continue;
      var answer = messages[i + 1];
      if (!answer || answer.role !== "assistant") {
        if (i === messages.length - 1) out.push({ role: "user", content: questionContent(m, sees) });
        continue;
      }
      i += 1;
      var partial = answer.content.trim() !== "";
      // A question whose answer failed, or was stopped before any text, never reached the conversation.
      if (answer.state === "done" || (answer.state === "stopped" && partial)) {
        out.push({ role: "user", content: questionContent(m, sees) });
        if (partial) out.push({ role: "assistant", content: answer.content });
      }
    }
    return out;
  }

  /**
   * The newest turns that fit the server's caps (`limits`: messages, characters, images, and the body's
   * bytes, which pictures fill); drops whole turns from the oldest end.
   */
  function fitHistory(messages, limits) {
    var kept = messages.slice();
    var total = 0; // characters of text
    var pictures = 0;
    var pictureChars = 0; // characters of the pictures' data URLs: most of the body
    function count(m, sign) {
      total += sign * textOf(m.content).length;
      imagesOf(m.content).forEach(function (part) {
        pictures += sign;
        pictureChars += sign * part.image_url.url.length;
      });
    }
    kept.forEach(function (m) { count(m, 1); });
    var dropped = 0;
    function dropFirst() {
      count(kept.shift(), -1);
      dropped += 1;
    }
    function over() {
      return kept.length > limits.maxMessages || total > limits.maxChars || pictures > limits.maxImages ||
        pictureChars + 2 * total > limits.bodyBytes; // 2 x: JSON escapes and framing, generously
    }
    while (kept.length > 1 && over()) {
      dropFirst();
      while (kept.length > 1 && kept[0].role !== "user") dropFirst(); // start on a user turn
    }
    return { messages: kept, dropped: dropped };
  }

  // ---------------------------------------------------------------- copying

  function legacyCopy(text) {
    var area = document.createElement("textarea");
    area.className = "copy-buffer";
    area.value = text;
    area.setAttribute("readonly", "");
    document.body.appendChild(area);
    area.select();
    var ok = false;
    try {
      ok = document.execCommand("copy");
    } catch (err) {
      ok = false;
    }
    document.body.removeChild(area);
    return ok;
  }

  function copyText(text, button) {
    var label = button.textContent;
    function done(ok) {
      button.textContent = ok ? "Copied" : "Select and copy";
      window.setTimeout(function () { button.textContent = label; }, 1500);
    }
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(function () { done(true); }, function () { done(legacyCopy(text)); });
    } else {
      done(legacyCopy(text));
    }
  }

  // ---------------------------------------------------------------- the page

  function intAttr(element, name, fallback) {
    var value = parseInt(element.getAttribute(name), 10);
    return isNaN(value) || value < 1 ? fallback : value;
  }

  function clone(id) {
    return document.getElementById(id).content.firstElementChild.cloneNode(true);
  }

  function isTyping(target) {
    return !!target && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName));
  }

  function start() {
    var app = document.getElementById("app");
    var transcript = document.getElementById("transcript");
    var empty = document.getElementById("empty");
    var form = document.getElementById("composer");
    var prompt = document.getElementById("prompt");
    var sendButton = document.getElementById("send");
    var stopButton = document.getElementById("stop");
    var newChatButton = document.getElementById("new-chat");
    var modelSelect = document.getElementById("model");
    var note = document.getElementById("note");
    var countdown = document.getElementById("countdown");
    var list = document.getElementById("conversations");
    var listEmpty = document.getElementById("conversations-empty");
    var sidebarToggle = document.getElementById("sidebar-toggle");
    var sidebarClose = document.getElementById("sidebar-close");
    var scrim = document.getElementById("scrim");
    var csrfMeta = document.querySelector('meta[name="csrf-token"]');

    var config = {
      chatUrl: app.getAttribute("data-chat-url") || "/api/chat",
      modelsUrl: app.getAttribute("data-models-url") || "/api/models",
      maxMessages: intAttr(app, "data-max-messages", 40),
      maxChars: intAttr(app, "data-max-total-chars", 32000),
      maxImages: intAttr(app, "data-max-images", 8),
      bodyBytes: intAttr(app, "data-max-body-bytes", 1048576) - 4096, // room for the rest of the body
    };
    var tray = window.ChatImages.createTray(
      {
        button: document.getElementById("attach"),
        input: document.getElementById("attach-input"),
        tray: document.getElementById("attachments"),
        prompt: prompt,
        zone: app, // a picture dropped anywhere on the page is attached, not opened in place of the page
      },
      { perMessage: intAttr(app, "data-max-images-per-message", 4), maxBytes: intAttr(app, "data-max-image-bytes", 786432) },
      function (text) {
        notes.images = text;
        showNotes();
      }
    );

    var storage = null;
    try {
      storage = window.localStorage;
    } catch (err) {
      storage = null; // storage blocked: the store keeps conversations in memory
    }
    var store = window.ChatStore.create(storage);

    var conv = null; // the open conversation: {id, title, renamed, created, updated, messages}
    var nodes = []; // the transcript element of each of conv.messages
    var current = null; // the turn being generated
    var blockedUntil = 0; // Date.now() before which the server asked us not to send
    var countdownTimer = 0;
    var notes = { history: "", storage: "", unavailable: "", images: "" };

    // ---- composer state

    function busy() {
      return current !== null;
    }

    function blocked() {
      return blockedUntil > Date.now();
    }

    function refreshComposer() {
      var isBusy = busy();
      sendButton.disabled = isBusy || blocked();
      stopButton.hidden = !isBusy;
      stopButton.disabled = !isBusy;
      app.classList.toggle("is-busy", isBusy);
      refreshActions();
    }

    function showNotes() {
      var text = [notes.images, notes.history, notes.storage, notes.unavailable].filter(Boolean).join(" ");
      note.textContent = text;
      note.hidden = !text;
    }

    function startCountdown(seconds) {
      blockedUntil = Date.now() + seconds * 1000;
      window.clearInterval(countdownTimer);
      function tick() {
        var left = Math.ceil((blockedUntil - Date.now()) / 1000);
        if (left <= 0) {
          window.clearInterval(countdownTimer);
          countdownTimer = 0;
          blockedUntil = 0;
          countdown.textContent = "";
          countdown.hidden = true;
          refreshComposer();
          return;
        }
        countdown.textContent = "You can send again in " + formatWait(left) + ".";
        countdown.hidden = false;
      }
      tick();
      countdownTimer = window.setInterval(tick, 250);
      refreshComposer();
    }

    function focusPrompt() {
      prompt.focus();
    }

    // ---- scrolling

    function nearBottom() {
      return transcript.scrollHeight - transcript.scrollTop - transcript.clientHeight < 80;
    }

    function scrollToEnd() {
      transcript.scrollTop = transcript.scrollHeight;
    }

    // ---- the transcript

    function addUserBubble(msg) {
      var node = clone("user-template");
      var bubble = node.querySelector(".bubble");
      bubble.textContent = msg.content;
      var thumbs = window.ChatImages.thumbnails(msg.images, "Attached image");
      if (thumbs) bubble.appendChild(thumbs);
      bubble.classList.toggle("has-images", !!thumbs);
      empty.hidden = true;
      transcript.appendChild(node);
      return node;
    }

    /** One assistant answer in the transcript and the ways to update it. */
    function addAnswer(msg) {
      var node = clone("assistant-template");
      var answer = node.querySelector(".answer");
      var renderer = window.ChatMarkdown.createRenderer(answer);
      var frame = 0;
      empty.hidden = true;
      transcript.appendChild(node);

      function render() {
        frame = 0;
        var follow = nearBottom();
        renderer.update(msg.content);
        if (follow) scrollToEnd();
      }

      var view = {
        node: node,
        /** Show new text of a streaming answer, at most once per frame. */
        streamed: function () {
          if (node.getAttribute("data-state") === "pending") {
            node.setAttribute("data-state", "streaming");
            node.querySelector(".status").textContent = "";
          }
          if (!frame) frame = window.requestAnimationFrame(render);
        },
        /** Show the answer as `msg` has it: text, state, status, usage and any error, in one layout step. */
        settle: function () {
          var follow = nearBottom();
          if (frame) window.cancelAnimationFrame(frame);
          frame = 0;
          renderer.update(msg.content);
          var settled = msg.state !== "pending" && msg.state !== "streaming";
          node.setAttribute("data-state", msg.state);
          node.setAttribute("aria-busy", settled ? "false" : "true");
          node.querySelector(".status").textContent = settled ? msg.status : "Thinking…";
          node.querySelector(".usage").textContent = msg.usage;
          var errorText = node.querySelector(".error-text");
          errorText.textContent = msg.error;
          errorText.hidden = !msg.error;
          node.querySelector(".copy").hidden = !settled || msg.content.trim() === "";
          if (follow) scrollToEnd();
        },
      };
      view.settle();
      return view;
    }

    function clearTranscript() {
      nodes.forEach(function (node) { node.remove(); });
      nodes = [];
      empty.hidden = false;
    }

    /** Show `conv` from scratch (after a reload, a switch or a new chat). */
    function showConversation() {
      transcript.setAttribute("aria-busy", "true"); // one announcement, not one per restored message
      clearTranscript();
      conv.messages.forEach(function (msg) {
        nodes.push(msg.role === "user" ? addUserBubble(msg) : addAnswer(msg).node);
      });
      transcript.setAttribute("aria-busy", "false");
      scrollToEnd();
      notes.history = "";
      showNotes();
      refreshActions();
      renderList();
    }

    /** Which of edit / regenerate / retry each message offers now. */
    function refreshActions() {
      var isBusy = busy();
      var last = conv ? conv.messages.length - 1 : -1;
      nodes.forEach(function (node, i) {
        var msg = conv.messages[i];
        if (msg.role === "user") {
          node.querySelector(".edit").hidden = isBusy;
          return;
        }
        var regenerate = node.querySelector(".regenerate");
        var retry = node.querySelector(".retry");
        var isLast = i === last;
        regenerate.hidden = isBusy || !isLast || (msg.state !== "done" && msg.state !== "stopped");
        retry.hidden = isBusy || !isLast || msg.state !== "error";
        retry.disabled = blocked();
        regenerate.disabled = blocked();
        var other = modelSelect.value && msg.model && modelSelect.value !== msg.model;
        regenerate.textContent = other ? "Regenerate with " + modelSelect.value : "Regenerate";
      });
    }

    // ---- storage

    function persist(keepTime) {
      if (!conv.messages.length) return;
      var firstQuestion = conv.messages[0];
      if (!conv.renamed && firstQuestion && firstQuestion.role === "user") {
        conv.title = window.ChatStore.titleFrom(firstQuestion.content);
      }
      var result = store.save(conv, keepTime);
      store.setOpen(conv.id);
      var said = [];
      if (result.dropped.length) {
        said.push("To make room in this browser, the oldest saved " +
          (result.dropped.length === 1 ? "conversation was" : result.dropped.length + " conversations were") +
          " removed: “" + result.dropped.join("”, “") + "”.");
      }
      if (!result.saved) said.push("This browser would not store this conversation: it is gone after a reload.");
      else if (result.trimmed) {
        said.push("This conversation is longer than this browser keeps: its oldest " +
          plural(result.trimmed, "message") + " will not come back after a reload.");
      }
      if (said.length || notes.storage) {
        notes.storage = said.join(" ");
        showNotes();
      }
      renderList();
    }

    /** The answer a reload interrupted can only be retried. */
    function interrupted(msg) {
      if (msg.role === "assistant" && (msg.state === "pending" || msg.state === "streaming")) {
        msg.state = "error";
        msg.status = msg.content.trim() ? "Incomplete" : "";
        msg.error = "The page was closed or reloaded before this answer finished.";
      }
    }

    function openConversation(id) {
      var found = id ? store.load(id) : null;
      if (found) found.messages.forEach(interrupted);
      conv = found || store.create();
      store.setOpen(found ? found.id : "");
      showConversation();
    }

    // ---- the conversation list

    function renderList() {
      var entries = store.list();
      var fragment = document.createDocumentFragment();
      entries.forEach(function (entry) {
        var item = clone("conversation-template");
        item.setAttribute("data-id", entry.id);
        var open = item.querySelector(".conv-open");
        open.textContent = entry.title;
        open.setAttribute("title", entry.title);
        if (conv && entry.id === conv.id) {
          item.classList.add("is-open");
          open.setAttribute("aria-current", "true");
        }
        item.querySelector(".conv-rename").setAttribute("aria-label", "Rename “" + entry.title + "”");
        item.querySelector(".conv-delete").setAttribute("aria-label", "Delete “" + entry.title + "”");
        fragment.appendChild(item);
      });
      list.replaceChildren(fragment);
      listEmpty.hidden = entries.length > 0;
    }

    function itemFor(id) {
      var items = list.querySelectorAll(".conv");
      for (var i = 0; i < items.length; i++) {
        if (items[i].getAttribute("data-id") === id) return items[i];
      }
      return null;
    }

    function startRename(item) {
      var id = item.getAttribute("data-id");
      var open = item.querySelector(".conv-open");
      var formEl = clone("rename-template");
      var input = formEl.querySelector("input");
      input.value = open.textContent;
      item.replaceChildren(formEl);
      input.focus();
      input.select();
      var finished = false;
      function finish(save) {
        if (finished) return;
        finished = true;
        var title = input.value.trim();
        if (save && title) {
          if (conv && conv.id === id) {
            conv.title = title.slice(0, 200);
            conv.renamed = true;
            persist(true);
          } else {
            store.rename(id, title);
          }
        }
        renderList();
        var again = itemFor(id);
        if (again) again.querySelector(".conv-rename").focus();
      }
      formEl.addEventListener("submit", function (event) {
        event.preventDefault();
        finish(true);
      });
      input.addEventListener("keydown", function (event) {
        if (event.key === "Escape") {
          event.preventDefault();
          event.stopPropagation();
          finish(false);
        }
      });
      input.addEventListener("blur", function () { finish(true); });
    }

    function confirmDelete(item) {
      var id = item.getAttribute("data-id");
      var title = item.querySelector(".conv-open").textContent;
      var box = clone("confirm-template");
      box.querySelector(".conv-confirm-text").textContent = "Delete “" + title + "”?";
      box.setAttribute("aria-label", "Delete “" + title + "”?");
      item.replaceChildren(box);
      box.querySelector(".conv-confirm-cancel").addEventListener("click", function () {
        renderList();
        var again = itemFor(id);
        if (again) again.querySelector(".conv-delete").focus();
      });
      box.querySelector(".conv-confirm-delete").addEventListener("click", function () {
        var items = Array.prototype.slice.call(list.querySelectorAll(".conv"));
        var position = items.indexOf(item);
        var wasOpen = conv && conv.id === id;
        if (wasOpen) detachTurn(); // first: settling the turn saves its conversation
        store.remove(id);
        if (wasOpen) {
          conv = store.create();
          showConversation();
        } else {
          renderList();
        }
        var rest = list.querySelectorAll(".conv-open");
        var next = rest[Math.min(position, rest.length - 1)];
        (next || newChatButton).focus();
      });
      box.querySelector(".conv-confirm-cancel").focus();
    }

    function setDrawer(open) {
      app.classList.toggle("sidebar-open", open);
      sidebarToggle.setAttribute("aria-expanded", open ? "true" : "false");
      scrim.hidden = !open;
      if (open) {
        var first = list.querySelector("[aria-current]") || list.querySelector(".conv-open") || sidebarClose;
        first.focus();
      }
    }

    function drawerOpen() {
      return app.classList.contains("sidebar-open");
    }

    // ---- one exchange

    function csrfHeaders() {
      var headers = { "Content-Type": "application/json", Accept: "text/event-stream" };
      var csrf = csrfMeta ? csrfMeta.getAttribute("content") : "";
      if (csrf) headers["X-CSRF-Token"] = csrf;
      return headers;
    }

    /** Ask for an answer to the conversation as it stands (it ends with a question). */
    function startTurn() {
      var fitted = fitHistory(turnsForServer(conv.messages, modelSees()), config);
      notes.history = fitted.dropped
        ? "Older messages were left out to fit the size limit: the model sees the last " +
          plural(fitted.messages.length, "message") + "."
        : "";
      showNotes();
      var msg = { role: "assistant", content: "", state: "pending", status: "", usage: "", error: "", model: "" };
      conv.messages.push(msg);
      var view = addAnswer(msg);
      nodes.push(view.node);
      scrollToEnd();
      var turn = {
        controller: new AbortController(), stopped: false, settled: false, conv: conv, msg: msg, view: view,
        startEvent: null, doneEvent: null, failure: null, retryAfter: null,
      };
      current = turn;
      persist();
      refreshComposer();

      function onData(data) {
        if (turn.settled || turn.doneEvent || turn.failure) return; // nothing counts after the last event
        var event;
        try {
          event = JSON.parse(data);
        } catch (err) {
          turn.failure = "The server sent an answer we could not read. Try again.";
          return;
        }
        if (!event || typeof event !== "object") return;
        if (event.type === "start") {
          turn.startEvent = event;
        } else if (event.type === "delta" && typeof event.content === "string") {
          msg.content += event.content;
          view.streamed();
        } else if (event.type === "done") {
          turn.doneEvent = event;
        } else if (event.type === "error") {
          turn.failure = describeError(event.code, event.message, null);
        }
      }

      function readStream(response) {
        var reader = response.body.getReader();
        var decoder = new TextDecoder();
        var parser = createSSEParser(onData);
        function pump() {
          return reader.read().then(function (result) {
            if (result.done) {
              parser.push(decoder.decode());
              return;
            }
            parser.push(decoder.decode(result.value, { stream: true }));
            if (turn.failure || turn.settled) return reader.cancel().catch(function () {});
            return pump();
          });
        }
        return pump();
      }

      function readJson(response) {
        return response.json().then(function (reply) {
          if (typeof reply.content !== "string") throw new Error("unexpected reply");
          msg.content += reply.content;
          turn.doneEvent = { type: "done", finish_reason: reply.finish_reason, usage: reply.usage, model: reply.model };
        });
      }

      fetch(config.chatUrl, {
        method: "POST",
        headers: csrfHeaders(),
        body: JSON.stringify({ messages: fitted.messages, model: modelSelect.value, stream: true }),
        signal: turn.controller.signal,
        credentials: "same-origin",
        cache: "no-store",
      })
        .then(function (response) {
          if (!response.ok) {
            return errorFromResponse(response).then(function (error) {
              turn.failure = error.text;
              turn.retryAfter = error.retryAfter;
            });
          }
          var type = response.headers.get("Content-Type") || "";
          if (type.indexOf("text/event-stream") === 0 && response.body) return readStream(response);
          if (type.indexOf("application/json") === 0) return readJson(response);
          turn.failure = "The server sent an answer we could not read. Try again.";
        })
        .catch(function (err) {
          if (turn.stopped || (err && err.name === "AbortError")) turn.stopped = true;
          else if (!turn.failure) turn.failure = "Could not reach the server. Check your connection and try again.";
        })
        .then(function () {
          settleTurn(turn);
        });
    }

    function usageLine(done, startEvent) {
      var parts = [];
      var u = done.usage;
      if (u && typeof u === "object") {
        parts.push((u.prompt_tokens || 0) + " prompt + " + (u.completion_tokens || 0) + " completion tokens");
      }
      var model = String(done.model || (startEvent && startEvent.model) || "");
      var degraded = done.degraded || (startEvent && startEvent.degraded);
      if (model) parts.push(degraded ? "answered by " + model + " (fallback)" : model);
      return parts.join(" · ");
    }

    function finishNote(reason) {
      if (reason === "length") return "Cut off at the length limit";
      if (reason === "content_filter") return "Stopped by the provider's content filter";
      return "";
    }

    /** Record how the turn ended in its message, save it, and show it. Runs once per turn. */
    function settleTurn(turn) {
      if (turn.settled) return;
      turn.settled = true;
      if (current === turn) current = null;
      var msg = turn.msg;
      var partial = msg.content.trim() !== "";
      var started = turn.doneEvent || turn.startEvent;
      msg.model = String((started && started.model) || "");
      if (turn.doneEvent && !turn.failure && !turn.stopped) {
        msg.state = "done";
        msg.status = finishNote(turn.doneEvent.finish_reason);
        msg.usage = usageLine(turn.doneEvent, turn.startEvent);
      } else if (turn.stopped) {
        msg.state = "stopped";
        msg.status = "Stopped";
      } else {
        msg.state = "error";
        msg.status = partial ? "Incomplete" : "";
        msg.error = turn.failure || "The answer was cut off before it finished. Try again.";
      }
      turn.view.settle();
      var stillOpen = turn.conv === conv;
      if (stillOpen) persist();
      else store.save(turn.conv);
      if (stillOpen && msg.state === "error") {
        var question = conv.messages[conv.messages.length - 2];
        if (question && prompt.value === "" && !tray.count()) {
          prompt.value = question.content; // offer the question again, with its pictures
          tray.restore(question.images);
        }
        if (turn.retryAfter && turn.retryAfter <= MAX_COUNTDOWN) startCountdown(turn.retryAfter);
      }
      refreshComposer();
      if (stillOpen && (document.activeElement === document.body || document.activeElement === stopButton ||
                        !document.activeElement)) {
        focusPrompt();
      }
    }

    /** Stop the turn in flight and settle it now, so nothing of it lands in what is shown next. */
    function detachTurn() {
      if (!current) return;
      var turn = current;
      turn.stopped = true;
      turn.controller.abort();
      settleTurn(turn);
    }

    function removeFrom(index) {
      conv.messages.splice(index);
      nodes.splice(index).forEach(function (node) { node.remove(); });
      empty.hidden = conv.messages.length > 0;
    }

    /** Drop a failed last turn (its question and the error), so asking again leaves no duplicate. */
    function dropFailedTurn() {
      var n = conv.messages.length;
      var last = conv.messages[n - 1];
      if (last && last.role === "assistant" && last.state === "error" && n >= 2) removeFrom(n - 2);
    }

    function ask(text, images) {
      if (!conv.renamed && !conv.messages.length) conv.title = window.ChatStore.titleFrom(text);
      var msg = { role: "user", content: text };
      if (images && images.length) msg.images = images;
      conv.messages.push(msg);
      nodes.push(addUserBubble(msg));
      startTurn();
    }

    function send() {
      var text = prompt.value;
      if (busy() || blocked() || (text.trim() === "" && !tray.count())) return;
      if (tray.count() && !modelSees()) {
        notes.images = modelSelect.value + " does not accept images: remove them or choose a model that does.";
        showNotes();
        return;
      }
      prompt.value = "";
      dropFailedTurn();
      ask(text, tray.take());
      focusPrompt();
    }

    /** Whether the selected model takes images (GET /api/models' details, as the options carry it). */
    function modelSees() {
      var option = modelSelect.options[modelSelect.selectedIndex];
      return !!option && option.getAttribute("data-images") === "true";
    }

    function refreshAttach() {
      tray.enable(modelSees());
      if (notes.images && (modelSees() || !tray.count())) {
        notes.images = "";
        showNotes();
      }
    }

    function regenerate() {
      var last = conv.messages[conv.messages.length - 1];
      if (busy() || blocked() || !last || last.role !== "assistant") return;
      var question = conv.messages[conv.messages.length - 2];
      removeFrom(conv.messages.length - 1);
      if (last.state === "error" && question && prompt.value === question.content) {
        prompt.value = "";
        tray.take(); // the question's pictures were offered again with it
      }
      startTurn();
      focusPrompt();
    }

    function editQuestion(index) {
      var node = nodes[index];
      var msg = conv.messages[index];
      if (busy() || !node || msg.role !== "user" || node.querySelector(".edit-form")) return;
      var bubble = node.querySelector(".bubble");
      var editor = clone("edit-template");
      var input = editor.querySelector(".edit-input");
      input.value = msg.content;
      bubble.hidden = true;
      node.querySelector(".msg-tools").hidden = true;
      node.classList.add("is-editing");
      node.insertBefore(editor, bubble);
      input.focus();
      input.setSelectionRange(input.value.length, input.value.length);

      function cancel() {
        editor.remove();
        bubble.hidden = false;
        node.querySelector(".msg-tools").hidden = false;
        node.classList.remove("is-editing");
        node.querySelector(".edit").focus();
      }

      function resend() {
        var text = input.value;
        if ((text.trim() === "" && !(msg.images || []).length) || busy() || blocked()) return;
        var at = nodes.indexOf(node);
        if (at === -1) return;
        removeFrom(at);
        ask(text, msg.images);
        focusPrompt();
      }

      editor.addEventListener("submit", function (event) {
        event.preventDefault();
        resend();
      });
      editor.querySelector(".edit-cancel").addEventListener("click", cancel);
      input.addEventListener("keydown", function (event) {
        if (event.key === "Escape") {
          event.preventDefault();
          event.stopPropagation();
          cancel();
        } else if (event.key === "Enter" && !event.shiftKey && !event.isComposing && !event.altKey &&
                   !event.ctrlKey && !event.metaKey) {
          event.preventDefault();
          resend();
        }
      });
    }

    function stop() {
      if (!current) return;
      current.stopped = true;
      current.controller.abort();
      focusPrompt();
    }

    function newChat() {
      detachTurn();
      conv = store.create();
      store.setOpen("");
      showConversation();
      prompt.value = "";
      if (drawerOpen()) setDrawer(false);
      focusPrompt();
    }

    function switchTo(id) {
      if (conv && conv.id === id) {
        if (drawerOpen()) setDrawer(false);
        focusPrompt();
        return;
      }
      detachTurn();
      openConversation(id);
      if (drawerOpen()) setDrawer(false);
      focusPrompt();
    }

    // ---- models

    function loadModels() {
      fetch(config.modelsUrl, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (response) {
          return response.ok ? response.json() : null;
        })
        .then(function (data) {
          if (!data || !Array.isArray(data.models) || !data.models.length) return;
          var chosen = modelSelect.value;
          var options = document.createDocumentFragment();
          var details = data.details && typeof data.details === "object" ? data.details : {};
          data.models.forEach(function (name) {
            var option = document.createElement("option");
            var about = details[name] || {};
            option.value = String(name);
            option.textContent = String(name) + (about.reasoning === true ? " · reasoning" : "");
            option.setAttribute("data-reasoning", about.reasoning === true ? "true" : "false");
            option.setAttribute("data-images", about.images === true ? "true" : "false");
            options.appendChild(option);
          });
          modelSelect.replaceChildren(options);
          var names = data.models.map(String);
          modelSelect.value = names.indexOf(chosen) !== -1 ? chosen
            : names.indexOf(String(data["default"])) !== -1 ? String(data["default"]) : names[0];
          refreshActions();
          refreshAttach();
        })
        .catch(function () {
          // Keep the options the page was rendered with.
        });
    }

    // ---- wiring

    form.addEventListener("submit", function (event) {
      event.preventDefault();
      send();
    });
    prompt.addEventListener("keydown", function (event) {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing && !event.altKey && !event.ctrlKey && !event.metaKey) {
        event.preventDefault();
        send();
      } else if (event.key === "Escape" && !event.shiftKey && current) {
        event.preventDefault();
        stop();
      }
    });
    stopButton.addEventListener("click", stop);
    newChatButton.addEventListener("click", newChat);
    modelSelect.addEventListener("change", function () {
      refreshActions();
      refreshAttach();
    });

    transcript.addEventListener("click", function (event) {
      var button = event.target.closest("button");
      if (!button || !transcript.contains(button)) return;
      var node = button.closest(".msg");
      var index = nodes.indexOf(node);
      if (button.classList.contains("code-copy")) {
        copyText(button.closest(".code").querySelector("pre code").textContent, button);
      } else if (button.classList.contains("copy") && index !== -1) {
        copyText(conv.messages[index].content, button);
      } else if (button.classList.contains("regenerate") || button.classList.contains("retry")) {
        if (index === conv.messages.length - 1) regenerate();
      } else if (button.classList.contains("edit") && index !== -1) {
        editQuestion(index);
      }
    });

    list.addEventListener("click", function (event) {
      var button = event.target.closest("button");
      var item = button && button.closest(".conv");
      if (!item || !item.getAttribute("data-id")) return;
      if (button.classList.contains("conv-open")) switchTo(item.getAttribute("data-id"));
      else if (button.classList.contains("conv-rename")) startRename(item);
      else if (button.classList.contains("conv-delete")) confirmDelete(item);
    });

    sidebarToggle.addEventListener("click", function () { setDrawer(!drawerOpen()); });
    sidebarClose.addEventListener("click", function () {
      setDrawer(false);
      sidebarToggle.focus();
    });
    scrim.addEventListener("click", function () { setDrawer(false); });

    document.addEventListener("keydown", function (event) {
      var key = event.key;
      if ((event.ctrlKey || event.metaKey) && event.shiftKey && !event.altKey && (key === "O" || key === "o")) {
        event.preventDefault();
        newChat();
      } else if (key === "Escape" && event.shiftKey) {
        event.preventDefault();
        if (drawerOpen()) setDrawer(false);
        focusPrompt();
      } else if (key === "Escape" && drawerOpen()) {
        event.preventDefault();
        setDrawer(false);
        sidebarToggle.focus();
      } else if (key === "/" && !event.ctrlKey && !event.metaKey && !event.altKey && !isTyping(event.target)) {
        event.preventDefault();
        focusPrompt();
      }
    });

    // Another tab changed the saved conversations: show the new list.
    window.addEventListener("storage", function (event) {
      if (event.key === null || event.key === window.ChatStore.INDEX) renderList();
    });

    // Leaving mid-answer: keep what arrived, marked as interrupted, so a reload can offer Retry.
    window.addEventListener("pagehide", function () {
      if (!current) return;
      var turn = current;
      turn.settled = true; // the request dies with the page: that is not a network error to record
      current = null;
      interrupted(turn.msg);
      store.save(turn.conv);
    });

    openConversation(store.openId());
    if (!store.persistent) {
      notes.unavailable = "This browser does not allow storage here: conversations last until the page is closed.";
      showNotes();
    }
    refreshAttach();
    loadModels();
    refreshComposer();
    focusPrompt();
    app.setAttribute("data-ready", "true");
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
