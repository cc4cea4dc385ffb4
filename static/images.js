/* chatproxy images: pictures attached to a question (picker, paste, drag and drop), for models that see.
 *
 * Each picture is decoded by the browser (createImageBitmap: no <img> of the file, no blob: URL), drawn
 * on a canvas at most MAX_SIDE pixels a side and sent as a JPEG data URL: small enough for the request
 * body cap and for conversations kept in localStorage. Thumbnails are <img> elements whose src is such
 * a data URL, checked by isDataImage (the CSP allows data: images and nothing else off this site).
 */
(function () {
  "use strict";

  var TYPES = ["image/png", "image/jpeg", "image/webp", "image/gif"];
  var MAX_SIDE = 1024; // pixels: a 1024 px image is 4 tiles at OpenAI's detail high, like anything larger
  var QUALITIES = [0.85, 0.7, 0.5]; // tried in turn until the picture fits the server's cap
  var DATA_IMAGE = /^data:image\/(png|jpeg|webp|gif);base64,[A-Za-z0-9+/]+={0,2}$/;

  /** Whether `url` is a base64 data URL of a picture type the server takes (anything else is never shown). */
  function isDataImage(url) {
    return typeof url === "string" && DATA_IMAGE.test(url);
  }

  /** The decoded bytes of a base64 data URL, from its length. */
  function bytesOf(url) {
    var data = url.slice(url.indexOf(",") + 1);
    return Math.floor((data.length * 3) / 4) - (data.slice(-2) === "==" ? 2 : data.slice(-1) === "=" ? 1 : 0);
  }

  /** A picture file as a JPEG data URL at most MAX_SIDE pixels a side and `maxBytes` bytes, or a rejection. */
  function resize(file, maxBytes) {
    return window.createImageBitmap(file).then(function (bitmap) {
      var scale = Math.min(1, MAX_SIDE / Math.max(bitmap.width, bitmap.height));
      var canvas = document.createElement("canvas");
      canvas.width = Math.max(1, Math.round(bitmap.width * scale));
      canvas.height = Math.max(1, Math.round(bitmap.height * scale));
      var context = canvas.getContext("2d");
      context.fillStyle = "#ffffff"; // JPEG has no transparency: transparent pixels become white, not black
      context.fillRect(0, 0, canvas.width, canvas.height);
      context.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
      if (bitmap.close) bitmap.close();
      for (var i = 0; i < QUALITIES.length; i++) {
        var url = canvas.toDataURL("image/jpeg", QUALITIES[i]);
        if (isDataImage(url) && bytesOf(url) <= maxBytes) return url;
      }
      throw new Error("too large");
    });
  }

  /** Thumbnails of checked data URLs, in one element (null when there are none). */
  function thumbnails(urls, label) {
    var shown = (urls || []).filter(isDataImage);
    if (!shown.length) return null;
    var box = document.createElement("div");
    box.className = "thumbs";
    shown.forEach(function (url, i) {
      var img = document.createElement("img");
      img.className = "thumb";
      img.alt = label + " " + (i + 1);
      img.src = url;
      box.appendChild(img);
    });
    return box;
  }

  /**
   * The composer's pictures: the attach button and its file input, the tray of thumbnails, paste into
   * `prompt` and drops on `zone` (the whole page: a picture dropped elsewhere would replace it). `limits`: {perMessage, maxBytes}; `say(text)` shows a note ("" clears).
   */
  function createTray(parts, limits, say) {
    var pending = []; // data URLs, in the order they were added
    var enabled = false;
    var working = 0; // pictures still being resized

    function render() {
      var fragment = document.createDocumentFragment();
      pending.forEach(function (url, i) {
        var item = document.createElement("div");
        item.className = "attachment";
        var img = document.createElement("img");
        img.className = "thumb";
        img.alt = "Image " + (i + 1) + " to send";
        img.src = url;
        var remove = document.createElement("button");
        remove.type = "button";
        remove.className = "tool attachment-remove";
        remove.textContent = "×";
        remove.setAttribute("aria-label", "Remove image " + (i + 1));
        remove.addEventListener("click", function () {
          pending.splice(i, 1);
          render();
          say("");
          parts.prompt.focus();
        });
        item.appendChild(img);
        item.appendChild(remove);
        fragment.appendChild(item);
      });
      parts.tray.replaceChildren(fragment);
      parts.tray.hidden = pending.length === 0;
    }

    function add(files) {
      var pictures = Array.prototype.filter.call(files || [], function (f) { return f && f.type.indexOf("image/") === 0; });
      if (!pictures.length) return false;
      if (!enabled) {
        say("The selected model does not accept images: choose one that does to attach them.");
        return true;
      }
      var refused = [];
      pictures.forEach(function (file) {
        if (TYPES.indexOf(file.type) === -1) {
          refused.push((file.name || "that file") + " is not a PNG, JPEG, WebP or GIF image");
          return;
        }
        if (pending.length + working >= limits.perMessage) {
          refused.push("at most " + limits.perMessage + " images go with one message");
          return;
        }
        working += 1;
        resize(file, limits.maxBytes)
          .then(function (url) {
            if (enabled && pending.length < limits.perMessage) pending.push(url);
          }, function () {
            say((file.name || "That image") + " could not be read as an image, or is too large.");
          })
          .then(function () {
            working -= 1;
            render();
          });
      });
      say(refused.length ? refused.join("; ") + "." : "");
      return true;
    }

    parts.button.addEventListener("click", function () {
      parts.input.value = "";
      parts.input.click();
    });
    parts.input.addEventListener("change", function () {
      add(parts.input.files);
      parts.prompt.focus();
    });
    parts.prompt.addEventListener("paste", function (event) {
      var data = event.clipboardData;
      if (data && data.files && data.files.length && add(data.files) && !data.getData("text")) event.preventDefault();
    });
    parts.zone.addEventListener("dragover", function (event) {
      var types = event.dataTransfer ? Array.prototype.slice.call(event.dataTransfer.types) : [];
      if (types.indexOf("Files") === -1) return;
      event.preventDefault(); // allows the drop
      event.dataTransfer.dropEffect = enabled ? "copy" : "none";
      parts.zone.classList.toggle("is-dropping", enabled);
    });
    parts.zone.addEventListener("dragleave", function (event) {
      if (!parts.zone.contains(event.relatedTarget)) parts.zone.classList.remove("is-dropping");
    });
    parts.zone.addEventListener("drop", function (event) {
      parts.zone.classList.remove("is-dropping");
      if (event.dataTransfer && add(event.dataTransfer.files)) event.preventDefault();
    });

    return {
      /** Offer attaching (the selected model sees) or not; pictures already in the tray stay. */
      enable: function (on) {
        enabled = on;
        parts.button.hidden = !on;
        parts.button.disabled = !on;
      },
      /** Whether pictures are in the tray, or still being read. */
      count: function () {
        return pending.length + working;
      },
      /** The pictures to send with the next question; the tray is emptied. */
      take: function () {
        var taken = pending;
        pending = [];
        render();
        return taken;
      },
      /** Put pictures back (a question that failed is offered again). */
      restore: function (urls) {
        pending = (urls || []).filter(isDataImage).slice(0, limits.perMessage);
        render();
      },
    };
  }

  window.ChatImages = {
    isDataImage: isDataImage,
    bytesOf: bytesOf,
    thumbnails: thumbnails,
    createTray: createTray,
  };
})();
