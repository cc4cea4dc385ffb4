/* chatproxy markdown: a small, safe markdown-to-DOM renderer for answers that stream in.
 *
 * Safety rule for this file: model text is only ever placed with createTextNode / textContent and
 * setAttribute on a fixed set of attributes. Nothing here parses HTML: embedded HTML shows as text.
 * Links open only absolute http(s) URLs; anything else stays plain text. No images are loaded.
 *
 * Supported: ATX headings, emphasis (*, _, **, __, ***), ~~strike~~, `code`, fenced code (``` or ~~~,
 * with the language shown and a copy button), block quotes, nested lists, GFM tables, thematic
 * breaks, [links](https://...), <https://...> and bare https:// URLs, backslash escapes.
 *
 * Streaming: createRenderer(container).update(text) is called with the whole answer so far. Blocks
 * that can no longer change are committed and never touched again; only the open tail is parsed,
 * and its DOM is reconciled child by child (unchanged list items and table rows are kept), so the
 * work per update stays proportional to what changed, not to the length of the answer.
 */
(function () {
  "use strict";

  var MAX_DEPTH = 8; // nesting of quotes/lists and of inline emphasis/links; deeper text stays plain
  var MAX_URL = 2048; // longer link targets are not links
  var MAX_TABLE_ROWS = 200; // rows beyond this are summarised, not built (a 10,000-row table stays responsive)
  var MAX_LANG = 30;

  // ---------------------------------------------------------------- block parsing

  var RE_BLANK = /^[ \t]*$/;
  var RE_FENCE = /^( {0,3})(`{3,}|~{3,})[ \t]*([^ \t]*)/;
  var RE_HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
  var RE_HR = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
  var RE_QUOTE = /^ {0,3}> ?/;
  var RE_ITEM = /^( *)([-+*]|(\d{1,9})([.)]))([ \t]+|$)/;
  var RE_DELIM_CELL = /^[ \t]*:?-+:?[ \t]*$/;

  function indentOf(line) {
    var i = 0;
    while (i < line.length && line.charCodeAt(i) === 32) i++;
    return i;
  }

  /** Leading tabs become 4 spaces, so indentation is counted one way. */
  function expandTabs(line) {
    if (line.indexOf("\t") === -1) return line;
    var lead = /^[ \t]*/.exec(line)[0];
    return lead.replace(/\t/g, "    ") + line.slice(lead.length);
  }

  function listItem(line) {
    var m = RE_ITEM.exec(line);
    if (!m) return null;
    if (RE_HR.test(line)) return null; // "* * *" and "- - -" are breaks, not items
    var ordered = m[3] !== undefined;
    var spacing = m[5].length;
    var empty = m[0].length === line.length;
    var markerEnd = m[1].length + m[2].length;
    var content = empty ? markerEnd + 1 : markerEnd + (spacing > 4 ? 1 : spacing);
    return {
      indent: m[1].length,
      ordered: ordered,
      bullet: ordered ? m[4] : m[2],
      number: ordered ? parseInt(m[3], 10) : 1,
      contentIndent: content,
      text: empty ? "" : line.slice(markerEnd + (spacing > 4 ? 1 : spacing)),
      empty: empty,
    };
  }

  /** Cells of a table row: split on unescaped pipes (outer pipes optional). */
  function splitRow(line) {
    var s = line.trim();
    if (s.charAt(0) === "|") s = s.slice(1);
    if (s.length && s.charAt(s.length - 1) === "|" && s.charAt(s.length - 2) !== "\\") s = s.slice(0, -1);
    var cells = [];
    var cell = "";
    for (var i = 0; i < s.length; i++) {
      var ch = s.charAt(i);
      if (ch === "\\" && s.charAt(i + 1) === "|") {
        cell += "|";
        i++;
      } else if (ch === "|") {
        cells.push(cell.trim());
        cell = "";
      } else {
        cell += ch;
      }
    }
    cells.push(cell.trim());
    return cells;
  }

  /** Column alignments when `line` is a delimiter row for `columns` columns, else null. */
  function delimiterRow(line, columns) {
    if (line.indexOf("|") === -1 || line.indexOf("-") === -1) return null;
    var cells = splitRow(line);
    if (cells.length !== columns) return null;
    var aligns = [];
    for (var i = 0; i < cells.length; i++) {
      if (!RE_DELIM_CELL.test(cells[i])) return null;
      var c = cells[i].trim();
      var left = c.charAt(0) === ":";
      var right = c.charAt(c.length - 1) === ":";
      aligns.push(left && right ? "center" : right ? "right" : left ? "left" : "");
    }
    return aligns;
  }

  function tableStart(lines, i) {
    var line = lines[i];
    if (i + 1 >= lines.length || line.indexOf("|") === -1 || indentOf(line) > 3) return null;
    var head = splitRow(line);
    var aligns = delimiterRow(lines[i + 1], head.length);
    return aligns ? { head: head, aligns: aligns } : null;
  }

  /** Is `line` a further row of a table? (Rows that start with a pipe are the fast, common case.) */
  function isRow(line) {
    var first = indentOf(line);
    if (first < 4 && line.charCodeAt(first) === 124) return true;
    return line.indexOf("|") !== -1 && !RE_BLANK.test(line) && !interrupts(line);
  }

  /** Does `line` begin a block that ends a paragraph? */
  function interrupts(line) {
    if (RE_FENCE.test(line) || RE_HEADING.test(line) || RE_HR.test(line) || RE_QUOTE.test(line)) return true;
    var item = listItem(line);
    // As in CommonMark, only a non-empty item, and for numbers only 1., may interrupt a paragraph.
    return !!item && item.indent < 4 && !item.empty && (!item.ordered || item.number === 1);
  }

  /**
   * Parse `text` into block descriptors: {t, key, start, ...}. `start` is the offset of the block's
   * first line in `text`; `key` is the block's source, so an equal key means an equal rendering.
   */
  function parseBlocks(text, depth) {
    var lines = text.split("\n");
    var offsets = new Array(lines.length);
    var pos = 0;
    for (var k = 0; k < lines.length; k++) {
      offsets[k] = pos;
      pos += lines[k].length + 1;
      lines[k] = expandTabs(lines[k]);
    }
    var blocks = [];
    var i = 0;
    var n = lines.length;

    function push(block, from, to) {
      block.start = offsets[from];
      block.key = block.t + "\u0000" + lines.slice(from, to).join("\n");
      blocks.push(block);
    }

    while (i < n) {
      var line = lines[i];
      if (RE_BLANK.test(line)) {
        i++;
        continue;
      }
      var from = i;
      var m;

      if (depth >= MAX_DEPTH) {
        // Too deeply nested: the rest is one plain paragraph.
        push({ t: "p", text: lines.slice(i).join("\n").trim(), plain: true }, i, n);
        break;
      }

      if ((m = RE_FENCE.exec(line))) {
        var fence = m[2];
        var lang = m[3];
        if (fence.charAt(0) === "`" && line.slice(m[0].length).indexOf("`") !== -1) {
          m = null; // a backtick fence's info string has no backticks: this is inline code
        } else {
          var body = [];
          var strip = m[1].length;
          var closed = false;
          i++;
          var closer = new RegExp("^ {0,3}" + (fence.charAt(0) === "`" ? "`" : "~") + "{" + fence.length + ",}[ \\t]*$");
          while (i < n) {
            if (closer.test(lines[i])) {
              closed = true;
              i++;
              break;
            }
            var l = lines[i];
            body.push(l.slice(Math.min(strip, indentOf(l))));
            i++;
          }
          push({ t: "code", lang: lang.replace(/[{}.]/g, "").slice(0, MAX_LANG), text: body.join("\n"), closed: closed },
            from, i);
          continue;
        }
      }

      if ((m = RE_HEADING.exec(line))) {
        push({ t: "h", level: m[1].length, text: (m[2] || "").trim() }, i, i + 1);
        i++;
        continue;
      }

      if (RE_HR.test(line)) {
        push({ t: "hr" }, i, i + 1);
        i++;
        continue;
      }

      if (RE_QUOTE.test(line)) {
        var inner = [];
        while (i < n && RE_QUOTE.test(lines[i])) {
          inner.push(lines[i].replace(RE_QUOTE, ""));
          i++;
        }
        push({ t: "quote", blocks: parseBlocks(inner.join("\n"), depth + 1) }, from, i);
        continue;
      }

      var item = listItem(line);
      if (item && item.indent < 4) {
        i = parseList(lines, i, item, depth, function (list, end) { push(list, from, end); });
        continue;
      }

      var table = tableStart(lines, i);
      if (table) {
        var rows = [];
        i += 2;
        while (i < n && isRow(lines[i])) {
          rows.push(lines[i]);
          i++;
        }
        push({ t: "table", head: table.head, aligns: table.aligns, rows: rows }, from, i);
        continue;
      }

      // A paragraph: until a blank line, a block start, or a line that heads a table.
      var para = [line.replace(/^[ \t]+/, "")];
      i++;
      while (i < n && !RE_BLANK.test(lines[i]) && !interrupts(lines[i]) && !tableStart(lines, i)) {
        para.push(lines[i].replace(/^[ \t]+/, ""));
        i++;
      }
      push({ t: "p", text: para.join("\n").replace(/[ \t]+$/, "") }, from, i);
    }
    return blocks;
  }

  /** Parse the list starting at line `i`; call done(list, endLine); return the line after it. */
  function parseList(lines, i, first, depth, done) {
    var n = lines.length;
    var items = [];
    var loose = false;
    var list = { t: "list", ordered: first.ordered, number: first.number, items: items, loose: false };
    var item = first;
    var end = i;
    while (item) {
      var body = [item.text];
      var blankRun = 0;
      var lazyOk = !item.empty;
      i++;
      while (i < n) {
        var line = lines[i];
        if (RE_BLANK.test(line)) {
          blankRun++;
          body.push("");
          i++;
          continue;
        }
        var ind = indentOf(line);
        if (ind >= item.contentIndent) {
          body.push(line.slice(item.contentIndent));
        } else if (ind >= 2 && ind > item.indent && listItem(line)) {
          body.push(line.slice(ind)); // a nested list indented less than CommonMark wants: keep it nested
        } else if (!blankRun && lazyOk && !interrupts(line) && !listItem(line)) {
          body.push(line); // lazy continuation of the item's paragraph
        } else {
          break;
        }
        blankRun = 0;
        i++;
      }
      while (body.length > 1 && body[body.length - 1] === "") body.pop();
      items.push({ key: "li\u0000" + body.join("\n"), blocks: parseBlocks(body.join("\n"), depth + 1) });
      end = i;
      var next = i < n ? listItem(lines[i]) : null;
      if (next && next.indent < item.contentIndent && next.ordered === first.ordered && next.bullet === first.bullet) {
        if (blankRun) loose = true;
        item = next;
      } else {
        item = null;
        i -= blankRun; // trailing blank lines belong to no block
        end = i;
      }
    }
    list.loose = loose;
    done(list, end);
    return end;
  }

  // ---------------------------------------------------------------- inline parsing

  var RE_SPECIAL = /[\\`*_~[<]|https?:\/\//g;
  var RE_ESCAPABLE = /[!-/:-@[-`{-~]/;
  var RE_WORD = /[\p{L}\p{N}]/u;
  var RE_SPACE = /\s/;

  function isWord(ch) {
    return ch !== "" && RE_WORD.test(ch);
  }

  function isSpace(ch) {
    return ch === "" || RE_SPACE.test(ch);
  }

  function escaped(text, i) {
    var count = 0;
    while (i - 1 - count >= 0 && text.charAt(i - 1 - count) === "\\") count++;
    return count % 2 === 1;
  }

  function runLength(text, i) {
    var ch = text.charAt(i);
    var j = i;
    while (j < text.length && text.charAt(j) === ch) j++;
    return j - i;
  }

  /** First element of a sorted array greater than or equal to `value`, or -1. */
  function firstAtLeast(sorted, value) {
    var lo = 0;
    var hi = sorted.length;
    while (lo < hi) {
      var mid = (lo + hi) >> 1;
      if (sorted[mid] < value) lo = mid + 1;
      else hi = mid;
    }
    return lo < sorted.length ? sorted[lo] : -1;
  }

  /**
   * One left-to-right pass: code spans (which bind tightest), and for every other delimiter run
   * the positions where it could close. Lookups are then binary searches, so unmatched openers
   * cost O(log n) each instead of a rescan: no quadratic blow-up on hostile input.
   */
  function scanInline(text) {
    var codeAt = {}; // start → {end, content}
    var closers = {}; // "*2" → sorted positions of right-flanking runs of ** (exact length)
    var brackets = {}; // "[" position → matching "]" position
    var ticks = {}; // backtick run length → sorted positions
    var i;
    for (i = 0; i < text.length; ) {
      if (text.charAt(i) === "`") {
        var len = runLength(text, i);
        (ticks[len] = ticks[len] || []).push(i);
        i += len;
      } else {
        i++;
      }
    }
    var stack = [];
    for (i = 0; i < text.length; ) {
      var ch = text.charAt(i);
      if (ch === "\\") {
        i += 2;
        continue;
      }
      if (ch === "`") {
        var L = runLength(text, i);
        var close = firstAtLeast(ticks[L], i + L);
        if (close !== -1 && !escaped(text, i)) {
          var content = text.slice(i + L, close).replace(/\n/g, " ");
          if (/^ .*[^ ].* $/.test(content) || /^ [^ ] $/.test(content)) content = content.slice(1, -1);
          codeAt[i] = { end: close + L, content: content };
          i = close + L;
        } else {
          i += L;
        }
        continue;
      }
      if (ch === "*" || ch === "_" || ch === "~") {
        var R = runLength(text, i);
        var before = i > 0 ? text.charAt(i - 1) : "";
        var after = text.charAt(i + R);
        var canClose = !isSpace(before) && (ch !== "_" || !isWord(after));
        if (canClose && R <= 3) (closers[ch + R] = closers[ch + R] || []).push(i);
        i += R;
        continue;
      }
      if (ch === "[") stack.push(i);
      else if (ch === "]" && stack.length) brackets[stack.pop()] = i;
      i++;
    }
    return { codeAt: codeAt, closers: closers, brackets: brackets };
  }

  /** The URL when `raw` is an absolute http(s) URL without credentials, else null. */
  function safeUrl(raw) {
    if (!raw || raw.length > MAX_URL || !/^https?:\/\//i.test(raw)) return null;
    var url;
    try {
      url = new URL(raw);
    } catch (err) {
      return null;
    }
    if ((url.protocol !== "http:" && url.protocol !== "https:") || url.username || url.password || !url.hostname) {
      return null;
    }
    return url;
  }

  function bareHost(host) {
    return host.toLowerCase().replace(/^www\./, "").replace(/\.$/, "");
  }

  /** A host named in a link's label ("example.com", "https://example.com/x"), or "". */
  function hostInLabel(label) {
    var m = /(?:^|[^\w.-])(?:https?:\/\/)?((?:[a-z0-9-]+\.)+[a-z]{2,})(?![\w-])/i.exec(" " + label);
    return m ? bareHost(m[1]) : "";
  }

  function makeLink(url, labelText, fill) {
    var a = document.createElement("a");
    a.setAttribute("href", url.href);
    a.setAttribute("target", "_blank");
    a.setAttribute("rel", "noopener noreferrer");
    a.setAttribute("data-target", url.href); // shown on hover and focus by chat.css
    fill(a);
    var named = hostInLabel(labelText);
    if (named && named !== bareHost(url.hostname)) {
      // The label names another site than the link opens: say where it really goes, in plain sight.
      a.className = "link-misleading";
      var real = document.createElement("span");
      real.className = "link-host";
      real.textContent = " (" + url.host + ")";
      a.appendChild(real);
    }
    return a;
  }

  /** Link destination after "](" at `i`: {url, end} or null. Titles are read and ignored. */
  function linkTarget(text, i) {
    var j = i;
    while (text.charAt(j) === " ") j++;
    var dest = "";
    if (text.charAt(j) === "<") {
      var gt = text.indexOf(">", j);
      if (gt === -1 || gt - j > MAX_URL) return null;
      dest = text.slice(j + 1, gt);
      j = gt + 1;
    } else {
      var depth = 0;
      var k = j;
      while (k < text.length && k - j <= MAX_URL) {
        var ch = text.charAt(k);
        if (ch === "\\" && k + 1 < text.length) {
          k += 2;
          continue;
        }
        if (ch === " " || ch === "\n") break;
        if (ch === "(") depth++;
        if (ch === ")") {
          if (!depth) break;
          depth--;
        }
        k++;
      }
      if (k - j > MAX_URL) return null;
      dest = text.slice(j, k).replace(/\\([!-/:-@[-`{-~])/g, "$1");
      j = k;
    }
    while (text.charAt(j) === " " || text.charAt(j) === "\n") j++;
    var q = text.charAt(j);
    if (q === '"' || q === "'") {
      var endq = text.indexOf(q, j + 1);
      if (endq === -1 || endq - j > MAX_URL) return null;
      j = endq + 1;
      while (text.charAt(j) === " ") j++;
    }
    if (text.charAt(j) !== ")") return null;
    return { dest: dest, end: j + 1 };
  }

  /** Where a bare URL starting at `i` ends (trailing punctuation and unbalanced ")" left out). */
  function bareUrlEnd(text, i) {
    var k = i;
    while (k < text.length && k - i <= MAX_URL && !/[\s<>"]/.test(text.charAt(k))) k++;
    var url = text.slice(i, k);
    for (;;) {
      var last = url.charAt(url.length - 1);
      if (/[.,:;!?'*_~]/.test(last)) {
        url = url.slice(0, -1);
      } else if (last === ")" && (url.split("(").length - 1) < (url.split(")").length - 1)) {
        url = url.slice(0, -1);
      } else {
        break;
      }
    }
    return i + url.length;
  }

  /** Append `text` with inline markdown to `parent`, as DOM nodes. */
  function appendInline(parent, text, depth, noLinks) {
    if (depth >= MAX_DEPTH || text.length === 0) {
      if (text) parent.appendChild(document.createTextNode(text));
      return;
    }
    var scan = scanInline(text);
    var buffer = "";
    var i = 0;
    var n = text.length;

    function flush() {
      if (buffer) {
        parent.appendChild(document.createTextNode(buffer));
        buffer = "";
      }
    }

    function wrap(tag, content) {
      var el = document.createElement(tag);
      appendInline(el, content, depth + 1, noLinks);
      flush();
      parent.appendChild(el);
      return el;
    }

    while (i < n) {
      RE_SPECIAL.lastIndex = i;
      var found = RE_SPECIAL.exec(text);
      if (!found) {
        buffer += text.slice(i);
        break;
      }
      if (found.index > i) buffer += text.slice(i, found.index);
      i = found.index;
      var ch = text.charAt(i);

      if (ch === "\\") {
        var next = text.charAt(i + 1);
        if (next === "\n") {
          buffer += next; // a backslash line break: the paragraph keeps its line breaks anyway
          i += 2;
        } else if (next && RE_ESCAPABLE.test(next)) {
          buffer += next;
          i += 2;
        } else {
          buffer += ch;
          i += 1;
        }
        continue;
      }

      if (ch === "`") {
        var span = scan.codeAt[i];
        if (span) {
          var code = document.createElement("code");
          code.textContent = span.content;
          flush();
          parent.appendChild(code);
          i = span.end;
        } else {
          var ticks = runLength(text, i);
          buffer += text.slice(i, i + ticks);
          i += ticks;
        }
        continue;
      }

      if (ch === "*" || ch === "_" || ch === "~") {
        var run = runLength(text, i);
        var before = i > 0 ? text.charAt(i - 1) : "";
        var after = text.charAt(i + run);
        var canOpen = !isSpace(after) && (ch !== "_" || !isWord(before));
        var list = scan.closers[ch + run];
        var close = canOpen && list && (ch !== "~" || run === 2) && run <= 3 ? firstAtLeast(list, i + run + 1) : -1;
        if (close !== -1) {
          var inner = text.slice(i + run, close);
          if (ch === "~") {
            wrap("del", inner);
          } else if (run === 1) {
            wrap("em", inner);
          } else if (run === 2) {
            wrap("strong", inner);
          } else {
            var strong = document.createElement("strong");
            var em = document.createElement("em");
            appendInline(em, inner, depth + 2, noLinks);
            strong.appendChild(em);
            flush();
            parent.appendChild(strong);
          }
          i = close + run;
        } else {
          buffer += text.slice(i, i + run);
          i += run;
        }
        continue;
      }

      if (ch === "[" && !noLinks) {
        var closeBracket = scan.brackets[i];
        if (closeBracket !== undefined && text.charAt(closeBracket + 1) === "(") {
          var target = linkTarget(text, closeBracket + 2);
          var url = target && safeUrl(target.dest);
          if (url) {
            var label = text.slice(i + 1, closeBracket);
            flush();
            parent.appendChild(makeLink(url, label, function (a) {
              appendInline(a, label || url.href, depth + 1, true);
            }));
            i = target.end;
            continue;
          }
        }
        buffer += ch;
        i += 1;
        continue;
      }

      if (ch === "<" && !noLinks) {
        var auto = /^<(https?:\/\/[^\s<>]+)>/i.exec(text.slice(i, i + MAX_URL + 2));
        var autoUrl = auto && safeUrl(auto[1]);
        if (autoUrl) {
          flush();
          parent.appendChild(makeLink(autoUrl, "", function (a) { a.textContent = auto[1]; }));
          i += auto[0].length;
          continue;
        }
        buffer += ch;
        i += 1;
        continue;
      }

      if (ch === "h" && !noLinks && !isWord(i > 0 ? text.charAt(i - 1) : "")) {
        var end = bareUrlEnd(text, i);
        var raw = text.slice(i, end);
        var bareUrl = safeUrl(raw);
        if (bareUrl && raw.length > 8) {
          flush();
          parent.appendChild(makeLink(bareUrl, "", function (a) { a.textContent = raw; }));
          i = end;
          continue;
        }
      }
      buffer += found[0];
      i += found[0].length;
    }
    flush();
  }

  // ---------------------------------------------------------------- building and reconciling the DOM

  var described = new WeakMap(); // element → the descriptor it was built from

  function el(tag, className) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    return node;
  }

  function buildCode(block) {
    var box = el("div", "code");
    var head = el("div", "code-head");
    var lang = el("span", "code-lang");
    lang.textContent = block.lang;
    var copy = el("button", "code-copy");
    copy.setAttribute("type", "button");
    copy.setAttribute("aria-label", block.lang ? "Copy the " + block.lang + " code" : "Copy the code");
    copy.textContent = "Copy";
    head.appendChild(lang);
    head.appendChild(copy);
    var pre = el("pre");
    var code = el("code");
    code.textContent = block.text;
    pre.appendChild(code);
    box.appendChild(head);
    box.appendChild(pre);
    return box;
  }

  function buildRow(line, columns, aligns, tag) {
    var tr = el("tr");
    var cells = splitRow(line);
    for (var c = 0; c < columns; c++) {
      var cell = el(tag, aligns[c] ? "align-" + aligns[c] : "");
      appendInline(cell, cells[c] || "", 1, false);
      tr.appendChild(cell);
    }
    return tr;
  }

  function buildTable(block) {
    var wrap = el("div", "table-wrap");
    wrap.setAttribute("tabindex", "0"); // wide tables scroll sideways: reachable by keyboard
    wrap.setAttribute("role", "region");
    wrap.setAttribute("aria-label", "Table");
    var table = el("table");
    var thead = el("thead");
    var headRow = el("tr");
    for (var c = 0; c < block.head.length; c++) {
      var th = el("th", block.aligns[c] ? "align-" + block.aligns[c] : "");
      th.setAttribute("scope", "col");
      appendInline(th, block.head[c], 1, false);
      headRow.appendChild(th);
    }
    thead.appendChild(headRow);
    table.appendChild(thead);
    table.appendChild(el("tbody"));
    wrap.appendChild(table);
    var more = el("p", "table-more");
    more.hidden = true;
    wrap.appendChild(more);
    patchTable(wrap, block);
    return wrap;
  }

  function patchTable(wrap, block) {
    var body = wrap.querySelector("tbody");
    var shown = Math.min(block.rows.length, MAX_TABLE_ROWS);
    var rows = body.children;
    var keep = 0;
    while (keep < rows.length && keep < shown && described.get(rows[keep]) === block.rows[keep]) keep++;
    while (rows.length > keep) body.removeChild(body.lastChild);
    for (var r = keep; r < shown; r++) {
      var tr = buildRow(block.rows[r], block.head.length, block.aligns, "td");
      described.set(tr, block.rows[r]);
      body.appendChild(tr);
    }
    var more = wrap.querySelector(".table-more");
    var hidden = block.rows.length - shown;
    more.hidden = hidden <= 0;
    more.textContent = hidden > 0
      ? "Showing the first " + shown + " of " + block.rows.length + " rows. Copy the answer to get them all."
      : "";
  }

  function buildList(block) {
    var list = el(block.ordered ? "ol" : "ul", block.loose ? "loose" : "tight");
    if (block.ordered && block.number !== 1) list.setAttribute("start", String(block.number));
    reconcile(list, block.items.map(function (item) { return { t: "li", key: item.key, blocks: item.blocks }; }), 0);
    return list;
  }

  function build(block) {
    var node;
    switch (block.t) {
      case "p":
        node = el("p");
        if (block.plain) node.textContent = block.text;
        else appendInline(node, block.text, 0, false);
        break;
      case "h":
        node = el("h" + Math.min(block.level + 1, 6)); // the page owns <h1>
        appendInline(node, block.text, 0, false);
        break;
      case "hr":
        node = el("hr");
        break;
      case "code":
        node = buildCode(block);
        break;
      case "quote":
        node = el("blockquote");
        reconcile(node, block.blocks, 0);
        break;
      case "list":
        node = buildList(block);
        break;
      case "li":
        node = el("li");
        reconcile(node, block.blocks, 0);
        break;
      case "table":
        node = buildTable(block);
        break;
      default:
        node = el("p");
        node.textContent = "";
    }
    described.set(node, block);
    return node;
  }

  /** Update `node` (built from `old`) to show `block` in place, when they are of a kind that can. */
  function patch(node, old, block) {
    if (old.t !== block.t) return false;
    switch (block.t) {
      case "code":
        if (old.lang !== block.lang) return false;
        var code = node.querySelector("pre code");
        var text = code.firstChild;
        if (text && block.text.lastIndexOf(old.text, 0) === 0) text.appendData(block.text.slice(old.text.length));
        else code.textContent = block.text;
        break;
      case "quote":
      case "li":
        reconcile(node, block.blocks, 0);
        break;
      case "list":
        if (old.ordered !== block.ordered || old.number !== block.number) return false;
        node.className = block.loose ? "loose" : "tight";
        reconcile(node, block.items.map(function (item) { return { t: "li", key: item.key, blocks: item.blocks }; }), 0);
        break;
      case "table":
        if (old.head.join("\u0000") !== block.head.join("\u0000") || old.aligns.join() !== block.aligns.join()) {
          return false;
        }
        patchTable(node, block);
        break;
      default:
        return false;
    }
    described.set(node, block);
    return true;
  }

  /** Make parent's element children from index `from` on show `blocks`: keep equal ones, patch or rebuild the rest. */
  function reconcile(parent, blocks, from) {
    var children = parent.children;
    for (var b = 0; b < blocks.length; b++) {
      var block = blocks[b];
      var node = children[from + b];
      if (!node) {
        parent.appendChild(build(block));
        continue;
      }
      var old = described.get(node);
      if (old && old.key === block.key) continue;
      if (old && patch(node, old, block)) continue;
      parent.replaceChild(build(block), node);
    }
    while (children.length > from + blocks.length) parent.removeChild(parent.lastElementChild);
  }

  // ---------------------------------------------------------------- the renderer

  /** A renderer for one growing answer in `container`; update(text) takes the whole text so far. */
  function createRenderer(container) {
    var committed = 0; // element children that can no longer change
    var openStart = 0; // where the first block that may still change begins
    var seen = "";

    function reset() {
      committed = 0;
      openStart = 0;
      container.replaceChildren();
    }

    return {
      update: function (text) {
        if (text.lastIndexOf(seen, 0) !== 0) reset(); // not a continuation: start over
        seen = text;
        var tail = text.slice(openStart);
        var blocks = parseBlocks(tail, 0);
        reconcile(container, blocks, committed);
        // A block is final once the next block starts on a complete line: later text cannot change it.
        var lastNewline = tail.lastIndexOf("\n");
        var final = 0;
        while (final < blocks.length - 1 && blocks[final + 1].start <= lastNewline) final++;
        if (final) {
          committed += final;
          openStart += blocks[final].start;
        }
      },
    };
  }

  /** Render `text` into `container` in one go. */
  function render(container, text) {
    createRenderer(container).update(text);
  }

  window.ChatMarkdown = {
    createRenderer: createRenderer,
    render: render,
    parseBlocks: parseBlocks,
    safeUrl: safeUrl,
    MAX_TABLE_ROWS: MAX_TABLE_ROWS,
  };
})();
