/* chatproxy conversations: kept in this browser's localStorage only; the server stores none of them.
 *
 * Layout: "chatproxy.v1.index" lists {id, title, updated, size}; each conversation is its own key
 * ("chatproxy.v1.conv.<id>"), so saving one does not rewrite the others; "chatproxy.v1.open" is the
 * conversation a reload reopens. Stored conversations together stay under CAP characters: the
 * least recently updated ones are dropped first. What comes back out of storage is checked and
 * coerced, since anything (an old version, another script, the user) may have written it.
 * A question's pictures (data URLs) are kept with it and count toward CAP like its text.
 */
(function () {
  "use strict";

  var PREFIX = "chatproxy.v1.";
  var INDEX = PREFIX + "index";
  var OPEN = PREFIX + "open";
  var CONV = PREFIX + "conv.";
  var CAP = 2000000; // characters (about 4 MB as UTF-16), under every browser's 5 MB-per-site quota
  var MAX_TITLE = 80;
  var STATES = { done: 1, stopped: 1, error: 1, pending: 1, streaming: 1 };
  var MAX_IMAGES = 16; // pictures kept with one question (the server's own cap is lower)

  function text(value, max) {
    var s = typeof value === "string" ? value : "";
    return max && s.length > max ? s.slice(0, max) : s;
  }

  function newId() {
    return Date.now().toString(36) + "-" + Math.random().toString(36).slice(2, 10);
  }

  /** A title from the first question: its first line, trimmed to MAX_TITLE characters. */
  function titleFrom(question) {
    var line = text(question).trim().split("\n")[0].replace(/\s+/g, " ");
    if (line.length > MAX_TITLE) line = line.slice(0, MAX_TITLE - 1).replace(/\s+\S*$/, "") + "…";
    return line || "New chat";
  }

  function cleanMessage(m) {
    if (!m || typeof m !== "object" || (m.role !== "user" && m.role !== "assistant")) return null;
    var out = { role: m.role, content: text(m.content) };
    if (m.role === "user" && Array.isArray(m.images)) {
      var images = m.images.filter(window.ChatImages.isDataImage).slice(0, MAX_IMAGES); // static/images.js
      if (images.length) out.images = images;
    }
    if (m.role === "assistant") {
      out.state = STATES[m.state] ? m.state : "done";
      out.status = text(m.status, 200);
      out.usage = text(m.usage, 200);
      out.error = text(m.error, 500);
      out.model = text(m.model, 100);
    }
    return out;
  }

  function cleanConversation(c) {
    if (!c || typeof c !== "object" || typeof c.id !== "string" || !Array.isArray(c.messages)) return null;
    var messages = [];
    for (var i = 0; i < c.messages.length; i++) {
      var m = cleanMessage(c.messages[i]);
      if (m) messages.push(m);
    }
    return {
      id: text(c.id, 64),
      title: text(c.title, 200) || "New chat",
      renamed: c.renamed === true,
      created: typeof c.created === "number" ? c.created : Date.now(),
      updated: typeof c.updated === "number" ? c.updated : 0,
      messages: messages,
    };
  }

  /** A store over `storage` (window.localStorage), or an in-memory one when the browser refuses storage. */
  function createStore(storage, cap) {
    cap = cap || CAP;
    var memory = {};
    var backend = storage;
    var persistent = true;
    try {
      var probe = PREFIX + "probe";
      backend.setItem(probe, "1");
      backend.removeItem(probe);
    } catch (err) {
      persistent = false;
      backend = {
        getItem: function (k) { return Object.prototype.hasOwnProperty.call(memory, k) ? memory[k] : null; },
        setItem: function (k, v) { memory[k] = String(v); },
        removeItem: function (k) { delete memory[k]; },
      };
    }

    function read(key) {
      try {
        var raw = backend.getItem(key);
        return raw === null ? null : JSON.parse(raw);
      } catch (err) {
        return null;
      }
    }

    function readIndex() {
      var raw = read(INDEX);
      if (!Array.isArray(raw)) return [];
      var seen = {};
      return raw.filter(function (e) {
        var ok = e && typeof e.id === "string" && !seen[e.id];
        if (ok) seen[e.id] = true;
        return ok;
      }).map(function (e) {
        return {
          id: e.id,
          title: text(e.title, 200) || "New chat",
          updated: typeof e.updated === "number" ? e.updated : 0,
          size: typeof e.size === "number" && e.size >= 0 ? e.size : 0,
        };
      });
    }

    function writeIndex(index) {
      backend.setItem(INDEX, JSON.stringify(index));
    }

    function drop(index, id) {
      try {
        backend.removeItem(CONV + id);
      } catch (err) {
        // Nothing more to do: the entry goes from the index either way.
      }
      return index.filter(function (e) { return e.id !== id; });
    }

    /** The least recently updated conversation other than `keep`, or null. */
    function oldest(index, keep) {
      var found = null;
      index.forEach(function (e) {
        if (e.id !== keep && (!found || e.updated < found.updated)) found = e;
      });
      return found;
    }

    return {
      persistent: persistent,
      cap: cap,

      /** Conversations, most recently updated first. */
      list: function () {
        return readIndex().sort(function (a, b) { return b.updated - a.updated; });
      },

      load: function (id) {
        var c = cleanConversation(read(CONV + id));
        return c && c.id === id ? c : null;
      },

      create: function () {
        var now = Date.now();
        return { id: newId(), title: "New chat", renamed: false, created: now, updated: now, messages: [] };
      },

      /**
       * Store `conv`, dropping the least recently updated other conversations while the total is over
       * the cap or the browser's quota. A conversation longer than the cap alone is stored without its
       * oldest turns. `keepTime`: keep its place in the list (a rename). Returns {dropped: [titles of
       * dropped conversations], trimmed: messages left out, saved}.
       */
      save: function (conv, keepTime) {
        if (!keepTime) conv.updated = Math.max(Date.now(), (conv.updated || 0) + 1);
        var stored = conv;
        var json = JSON.stringify(stored);
        var trimmed = 0;
        while (json.length > cap && stored.messages.length > 2) {
          trimmed += 2;
          stored = Object.assign({}, conv, { messages: conv.messages.slice(trimmed) });
          json = JSON.stringify(stored);
        }
        var index = readIndex().filter(function (e) { return e.id !== conv.id; });
        var entry = { id: conv.id, title: conv.title, updated: conv.updated, size: json.length };
        var dropped = [];
        function total() {
          return index.reduce(function (sum, e) { return sum + e.size; }, entry.size);
        }
        while (total() > cap && oldest(index, conv.id)) {
          var gone = oldest(index, conv.id);
          dropped.push(gone.title);
          index = drop(index, gone.id);
        }
        for (;;) {
          try {
            if (json.length > cap) throw new Error("too big to keep");
            backend.setItem(CONV + conv.id, json);
            index.push(entry);
            writeIndex(index);
            return { dropped: dropped, trimmed: trimmed, saved: true };
          } catch (err) {
            var victim = json.length > cap ? null : oldest(index, conv.id); // over the quota: make room
            if (!victim) {
              drop(index, conv.id);
              this.writeList(index);
              return { dropped: dropped, trimmed: trimmed, saved: false };
            }
            dropped.push(victim.title);
            index = drop(index, victim.id);
          }
        }
      },

      writeList: function (index) {
        try {
          writeIndex(index);
        } catch (err) {
          // The index is small; if even it cannot be written, the next save tries again.
        }
      },

      rename: function (id, title) {
        var conv = this.load(id);
        if (!conv) return null;
        conv.title = text(title, 200).trim() || conv.title;
        conv.renamed = true;
        this.save(conv, true); // renaming does not move it up the list
        return conv;
      },

      remove: function (id) {
        this.writeList(drop(readIndex(), id));
        if (this.openId() === id) this.setOpen("");
      },

      openId: function () {
        try {
          return text(backend.getItem(OPEN), 64);
        } catch (err) {
          return "";
        }
      },

      setOpen: function (id) {
        try {
          if (id) backend.setItem(OPEN, id);
          else backend.removeItem(OPEN);
        } catch (err) {
          // Reopening after a reload is a convenience.
        }
      },
    };
  }

  window.ChatStore = {
    create: createStore,
    titleFrom: titleFrom,
    CAP: CAP,
    INDEX: INDEX,
  };
})();
