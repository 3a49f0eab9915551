/// The live page served at `/`: plain HTML and JavaScript, no build step. It connects to
/// `/ws`, subscribes to a table with an optional filter, shows each change as it arrives
/// (operation, commit time, row), remembers the last cursor and, after a drop, reconnects
/// and resubscribes with `since` so nothing is missed. When the server has auth on, a token
/// pasted into the page (or given as `?access_token=` in the page's URL) is sent as the
/// `access_token` query parameter of `/ws`.
public enum LivePage {
    /// The page; `table` pre-fills the table input.
    public static func html(table: String = "public.demo_orders") -> String {
        page.replacingOccurrences(of: "__TABLE__", with: escape(table))
    }

    private static func escape(_ text: String) -> String {
        text.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "\"", with: "&quot;")
            .replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
    }

    private static let page = #"""
        <!doctype html>
        <html lang="en">
        <head>
        <meta charset="utf-8">
        <meta name="viewport" content="width=device-width, initial-scale=1">
        <title>realtime-sync: live changes</title>
        <style>
        body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
        form { display: flex; gap: .5em; flex-wrap: wrap; align-items: end; margin-bottom: 1em; }
        label { display: flex; flex-direction: column; font-size: 12px; color: #555; }
        input { font: 14px monospace; padding: .3em; min-width: 14em; }
        #status { margin: .5em 0; font-weight: 600; }
        table { border-collapse: collapse; width: 100%; }
        th, td { text-align: left; padding: .25em .5em; border-bottom: 1px solid #eee; vertical-align: top; }
        td.row { font-family: monospace; white-space: pre-wrap; word-break: break-all; }
        .INSERT { color: #1a7f37; } .UPDATE { color: #9a6700; } .DELETE { color: #cf222e; }
        </style>
        </head>
        <body>
        <h1>realtime-sync</h1>
        <form id="form">
          <label>table <input id="table" value="__TABLE__"></label>
          <label>filter (optional) <input id="filter" placeholder="status=eq.paid"></label>
          <label>token (when auth is on) <input id="token" type="password" placeholder="realtime-sync token …" autocomplete="off"></label>
          <button id="subscribe" type="submit">subscribe</button>
        </form>
        <div id="status">connecting…</div>
        <div>last cursor: <code id="cursor">none</code></div>
        <table><thead><tr><th>op</th><th>commit time</th><th>row</th></tr></thead><tbody id="changes"></tbody></table>
        <script>
        "use strict";
        const statusEl = document.getElementById("status");
        const cursorEl = document.getElementById("cursor");
        const rows = document.getElementById("changes");
        let socket = null, lastCursor = null, subscription = null, retry = 500, counter = 0, usedToken = "";
        const tokenEl = document.getElementById("token");
        tokenEl.value = new URLSearchParams(location.search).get("access_token") || "";

        function currentToken() { return tokenEl.value.trim(); }

        function setStatus(text) { statusEl.textContent = text; }

        function subscribe() {
          if (!socket || socket.readyState !== WebSocket.OPEN || !subscription) return;
          const message = { type: "subscribe", id: subscription.id, table: subscription.table };
          if (subscription.filter) message.filter = subscription.filter;
          if (lastCursor) message.since = lastCursor;
          socket.send(JSON.stringify(message));
        }

        function show(message) {
          const tr = document.createElement("tr");
          const op = document.createElement("td"); op.textContent = message.op; op.className = message.op;
          const time = document.createElement("td"); time.textContent = message.commit_time || "";
          const row = document.createElement("td"); row.className = "row";
          row.textContent = JSON.stringify(message.new || message.old || {});
          tr.append(op, time, row);
          rows.prepend(tr);
          while (rows.children.length > 200) rows.lastChild.remove();
        }

        function connect() {
          usedToken = currentToken();
          const query = usedToken ? "?access_token=" + encodeURIComponent(usedToken) : "";
          const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws" + query;
          socket = new WebSocket(url);
          socket.onopen = () => { retry = 500; setStatus("connected"); subscribe(); };
          socket.onmessage = (event) => {
            const message = JSON.parse(event.data);
            switch (message.type) {
              case "subscribed": setStatus("subscribed to " + subscription.table); if (!lastCursor) lastCursor = message.cursor; break;
              case "change": show(message); lastCursor = message.cursor; break;
              case "resync_required": lastCursor = null; setStatus("resync required: " + message.message); subscribe(); break;
              case "error": setStatus("error " + message.code + ": " + message.message); break;
            }
            cursorEl.textContent = lastCursor || "none";
          };
          socket.onclose = (event) => {
            const hint = event.code === 1008 ? " (token expired: paste a new one)" : event.code === 1006 ? " (refused? a missing or bad token gets 401)" : "";
            setStatus("disconnected (" + event.code + ")" + hint + ", reconnecting in " + retry + " ms…");
            setTimeout(connect, retry);
            retry = Math.min(retry * 2, 10000);
          };
        }

        document.getElementById("form").addEventListener("submit", (event) => {
          event.preventDefault();
          if (subscription && socket && socket.readyState === WebSocket.OPEN) {
            socket.send(JSON.stringify({ type: "unsubscribe", id: subscription.id }));
          }
          lastCursor = null;
          rows.replaceChildren();
          subscription = {
            id: "s" + (++counter),
            table: document.getElementById("table").value.trim(),
            filter: document.getElementById("filter").value.trim()
          };
          if (socket && currentToken() !== usedToken) {
            socket.close();  // reconnect with the new token; onclose reconnects and subscribes
          } else {
            subscribe();
          }
        });

        subscription = { id: "s" + (++counter), table: document.getElementById("table").value.trim(), filter: "" };
        connect();
        </script>
        </body>
        </html>
        """#
}
