/* chatproxy chat page: streams answers from POST /api/chat (SSE) into the transcript.
 *
 * Safety rule for this file: text from the model, the user or the server is only ever
 * placed with textContent / createTextNode. Nothing here parses HTML.
 */
(function () {
  "use strict";

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

  // ---------------------------------------------------------------- formatting (DOM only)

  var FENCE = /^\s{0,3}```(.*)$/;

  /** Render text as paragraphs, `inline code` and fenced code blocks, built from DOM nodes only. */
  function renderText(container, text) {
    var fragment = document.createDocumentFragment();
    var paragraph = [];
    var code = null;

    function flushParagraph() {
      if (!paragraph.length) return;
      var p = document.createElement("p");
      appendInline(p, paragraph.join("\n"));
      fragment.appendChild(p);
      paragraph = [];
    }

    function flushCode() {
      var figure = document.createElement("div");
      figure.className = "code";
      if (code.lang) {
        var label = document.createElement("div");
        label.className = "code-lang";
        label.textContent = code.lang;
        figure.appendChild(label);
      }
      var pre = document.createElement("pre");
      var element = document.createElement("code");
      element.textContent = code.lines.join("\n");
      pre.appendChild(element);
      figure.appendChild(pre);
      fragment.appendChild(figure);
      code = null;
    }

    text.split("\n").forEach(function (line) {
      var fence = FENCE.exec(line);
      if (code) {
        if (fence && fence[1].trim() === "") flushCode();
        else code.lines.push(line);
      } else if (fence) {
        flushParagraph();
        code = { lang: fence[1].trim().split(/\s+/)[0].slice(0, 30), lines: [] };
      } else if (line.trim() === "") {
        flushParagraph();
      } else {
        paragraph.push(line);
      }
    });
    flushParagraph();
    if (code) flushCode(); // still streaming, or the model never closed the fence
    container.replaceChildren(fragment);
  }

  /** Append text to an element, turning `spans` into <code> elements. */
  function appendInline(parent, text) {
    var pattern = /`([^`\n]+)`/g;
    var last = 0;
    var match;
    while ((match = pattern.exec(text)) !== null) {
      if (match.index > last) parent.appendChild(document.createTextNode(text.slice(last, match.index)));
      var code = document.createElement("code");
      code.textContent = match[1];
      parent.appendChild(code);
      last = pattern.lastIndex;
    }
    if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
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

  /** What to tell the user for an error code from the server. */
  function describeError(code, message, retryAfter) {
    code = String(code || "");
    if (code === "rate_limited" || code === "upstream_rate_limited") {
      return retryAfter
        ? "Too many requests — try again in " + plural(retryAfter, "second") + "."
        : "Too many requests — try again in a moment.";
    }
    if (code === "budget_exceeded") {
      return "The spending limit for today has been reached. Please try again tomorrow.";
    }
    if (code.indexOf("upstream_") === 0) {
      return retryAfter
        ? "The model provider is having trouble — try again in " + plural(retryAfter, "second") + "."
        : "The model provider is having trouble — try again later.";
    }
    if (message) return String(message);
    return "Something went wrong. Try again.";
  }

  /** Read a non-2xx response as the error contract, or describe it by its status. */
  function errorFromResponse(response) {
    var retryAfter = retryAfterSeconds(response.headers.get("Retry-After"));
    return response
      .json()
      .then(function (body) {
        var error = body && body.error;
        if (!error || typeof error !== "object") throw new Error("not the error contract");
        return describeError(error.code, error.message, retryAfter);
      })
      .catch(function () {
        if (response.status === 429) return describeError("rate_limited", "", retryAfter);
        if (response.status >= 500) return "The server could not answer (HTTP " + response.status + "). Try again later.";
        return "The request failed (HTTP " + response.status + ").";
      });
  }

  // ---------------------------------------------------------------- history

  /** The newest turns that fit the server's caps; drops whole turns from the oldest end. */
  function fitHistory(messages, maxMessages, maxChars) {
    var kept = messages.slice();
    var total = kept.reduce(function (sum, m) { return sum + m.content.length; }, 0);
    var dropped = 0;
    function dropFirst() {
      total -= kept.shift().content.length;
      dropped += 1;
    }
    while (kept.length > 1 && (kept.length > maxMessages || total > maxChars)) {
      dropFirst();
      while (kept.length > 1 && kept[0].role !== "user") dropFirst(); // start on a user turn
    }
    return { messages: kept, dropped: dropped };
  }

  // ---------------------------------------------------------------- the page

  function intAttr(element, name, fallback) {
    var value = parseInt(element.getAttribute(name), 10);
    return isNaN(value) || value < 1 ? fallback : value;
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
    var userTemplate = document.getElementById("user-template");
    var assistantTemplate = document.getElementById("assistant-template");
    var csrfMeta = document.querySelector('meta[name="csrf-token"]');

    var config = {
      chatUrl: app.getAttribute("data-chat-url") || "/api/chat",
      modelsUrl: app.getAttribute("data-models-url") || "/api/models",
      maxMessages: intAttr(app, "data-max-messages", 40),
      maxChars: intAttr(app, "data-max-total-chars", 32000),
    };

    var history = []; // [{role, content}] of finished turns, oldest first
    var current = null; // the turn being generated: {controller, ...}
    var conversation = 0; // bumped by "New chat" so a late reply cannot land in a new chat

    // ---- UI state

    function setBusy(busy) {
      sendButton.disabled = busy;
      stopButton.hidden = !busy;
      stopButton.disabled = !busy;
      app.classList.toggle("is-busy", busy);
      if (!busy && (document.activeElement === stopButton || document.activeElement === document.body)) {
        prompt.focus();
      }
    }

    function showNote(text) {
      note.textContent = text || "";
      note.hidden = !text;
    }

    function nearBottom() {
      return transcript.scrollHeight - transcript.scrollTop - transcript.clientHeight < 80;
    }

    function scrollToEnd() {
      transcript.scrollTop = transcript.scrollHeight;
    }

    function addUserBubble(text) {
      var node = userTemplate.content.firstElementChild.cloneNode(true);
      node.querySelector(".bubble").textContent = text;
      empty.hidden = true;
      transcript.appendChild(node);
      return node;
    }

    /** One assistant answer in the transcript and the ways to update it. */
    function addAnswer() {
      var node = assistantTemplate.content.firstElementChild.cloneNode(true);
      var answer = node.querySelector(".answer");
      var errorText = node.querySelector(".error-text");
      var status = node.querySelector(".status");
      var usage = node.querySelector(".usage");
      var copy = node.querySelector(".copy");
      var text = "";
      var frame = 0;
      transcript.appendChild(node);
      status.textContent = "Thinking…";
      scrollToEnd();

      function render() {
        frame = 0;
        var follow = nearBottom();
        renderText(answer, text);
        if (follow) scrollToEnd();
      }

      copy.addEventListener("click", function () {
        copyText(text, copy);
      });

      return {
        append: function (piece) {
          text += piece;
          if (node.getAttribute("data-state") === "pending") {
            node.setAttribute("data-state", "streaming");
            status.textContent = "";
          }
          if (!frame) frame = window.requestAnimationFrame(render);
        },
        text: function () {
          return text;
        },
        /** Settle the answer: final text, state, status, usage line and any error, in one layout step. */
        finish: function (state, details) {
          var follow = nearBottom();
          if (frame) window.cancelAnimationFrame(frame);
          frame = 0;
          renderText(answer, text);
          node.setAttribute("data-state", state);
          node.setAttribute("aria-busy", "false");
          status.textContent = details.status || "";
          usage.textContent = details.usage || "";
          if (details.error) {
            errorText.textContent = details.error;
            errorText.hidden = false;
          }
          copy.hidden = text.trim() === "";
          if (follow) scrollToEnd();
        },
      };
    }

    function usageLine(done, startEvent) {
      var parts = [];
      var u = done.usage;
      if (u && typeof u === "object") {
        parts.push((u.prompt_tokens || 0) + " prompt + " + (u.completion_tokens || 0) + " completion tokens");
      }
      var model = done.model || (startEvent && startEvent.model) || "";
      var degraded = done.degraded || (startEvent && startEvent.degraded);
      if (model) parts.push(degraded ? "answered by " + model + " (fallback)" : model);
      return parts.join(" · ");
    }

    function finishNote(reason) {
      if (reason === "length") return "Cut off at the length limit";
      if (reason === "content_filter") return "Stopped by the provider's content filter";
      return "";
    }

    // ---- copying

    function copyText(text, button) {
      function done(ok) {
        button.textContent = ok ? "Copied" : "Select and copy";
        window.setTimeout(function () { button.textContent = "Copy"; }, 1500);
      }
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(text).then(function () { done(true); }, function () { done(legacyCopy(text)); });
      } else {
        done(legacyCopy(text));
      }
    }

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

    // ---- one exchange

    function send() {
      var text = prompt.value;
      if (current || text.trim() === "") return;
      var fitted = fitHistory(history.concat([{ role: "user", content: text }]), config.maxMessages, config.maxChars);
      showNote(
        fitted.dropped
          ? "Older messages were left out to fit the size limit: the model sees the last " +
              plural(fitted.messages.length, "message") + "."
          : ""
      );
      prompt.value = "";
      addUserBubble(text);
      var answer = addAnswer();
      var controller = new AbortController();
      var turn = { controller: controller, stopped: false, conversation: conversation };
      current = turn;
      setBusy(true);

      var headers = { "Content-Type": "application/json", Accept: "text/event-stream" };
      var csrf = csrfMeta ? csrfMeta.getAttribute("content") : "";
      if (csrf) headers["X-CSRF-Token"] = csrf;
      var body = JSON.stringify({ messages: fitted.messages, model: modelSelect.value, stream: true });

      var startEvent = null;
      var doneEvent = null;
      var failure = null;

      function onData(data) {
        if (doneEvent || failure) return; // nothing counts after the last event
        var event;
        try {
          event = JSON.parse(data);
        } catch (err) {
          failure = "The server sent an answer we could not read. Try again.";
          return;
        }
        if (!event || typeof event !== "object") return;
        if (event.type === "start") startEvent = event;
        else if (event.type === "delta" && typeof event.content === "string") answer.append(event.content);
        else if (event.type === "done") doneEvent = event;
        else if (event.type === "error") failure = describeError(event.code, event.message, null);
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
            if (failure) return reader.cancel().catch(function () {});
            return pump();
          });
        }
        return pump();
      }

      function readJson(response) {
        return response.json().then(function (reply) {
          if (typeof reply.content !== "string") throw new Error("unexpected reply");
          answer.append(reply.content);
          doneEvent = { type: "done", finish_reason: reply.finish_reason, usage: reply.usage, model: reply.model };
        });
      }

      fetch(config.chatUrl, {
        method: "POST",
        headers: headers,
        body: body,
        signal: controller.signal,
        credentials: "same-origin",
        cache: "no-store",
      })
        .then(function (response) {
          if (!response.ok) {
            return errorFromResponse(response).then(function (message) { failure = message; });
          }
          var type = response.headers.get("Content-Type") || "";
          if (type.indexOf("text/event-stream") === 0 && response.body) return readStream(response);
          if (type.indexOf("application/json") === 0) return readJson(response);
          failure = "The server sent an answer we could not read. Try again.";
        })
        .catch(function (err) {
          if (turn.stopped || (err && err.name === "AbortError")) turn.stopped = true;
          else if (!failure) failure = "Could not reach the server. Check your connection and try again.";
        })
        .then(function () {
          finishTurn(turn, text, answer, startEvent, doneEvent, failure);
        });
    }

    function finishTurn(turn, text, answer, startEvent, doneEvent, failure) {
      if (current === turn) current = null;
      var partial = answer.text();
      var sameChat = turn.conversation === conversation;
      if (doneEvent && !failure && !turn.stopped) {
        answer.finish("done", { status: finishNote(doneEvent.finish_reason), usage: usageLine(doneEvent, startEvent) });
        if (sameChat) {
          history.push({ role: "user", content: text });
          if (partial.trim()) history.push({ role: "assistant", content: partial });
        }
      } else if (turn.stopped) {
        answer.finish("stopped", { status: "Stopped" });
        if (sameChat && partial.trim()) {
          history.push({ role: "user", content: text }, { role: "assistant", content: partial });
        }
      } else {
        answer.finish("error", {
          status: partial.trim() ? "Incomplete" : "",
          error: failure || "The answer was cut off before it finished. Try again.",
        });
        if (sameChat && prompt.value === "") prompt.value = text; // offer the question again
      }
      if (!current) setBusy(false);
    }

    function stop() {
      if (!current) return;
      current.stopped = true;
      current.controller.abort();
    }

    function newChat() {
      if (current) {
        current.stopped = true;
        current.controller.abort();
        current = null; // the aborted turn settles on its own, outside this chat
        setBusy(false);
      }
      conversation += 1;
      history = [];
      Array.prototype.slice.call(transcript.querySelectorAll(".msg")).forEach(function (node) {
        node.remove();
      });
      empty.hidden = false;
      showNote("");
      prompt.value = "";
      prompt.focus();
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
          data.models.forEach(function (name) {
            var option = document.createElement("option");
            option.value = String(name);
            option.textContent = String(name);
            options.appendChild(option);
          });
          modelSelect.replaceChildren(options);
          var names = data.models.map(String);
          modelSelect.value = names.indexOf(chosen) !== -1 ? chosen
            : names.indexOf(String(data["default"])) !== -1 ? String(data["default"]) : names[0];
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
      } else if (event.key === "Escape" && current) {
        event.preventDefault();
        stop();
      }
    });
    stopButton.addEventListener("click", stop);
    newChatButton.addEventListener("click", newChat);

    loadModels();
    setBusy(false);
    prompt.focus();
    app.setAttribute("data-ready", "true");
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
