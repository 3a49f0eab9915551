/// The live page served at `/`: plain HTML and JavaScript, no build step. It connects to
/// `/ws`, subscribes to a table with an optional filter, shows each change as it arrives
/// (operation, commit time, row), remembers the last cursor and, after a drop, reconnects
/// (with a jittered backoff) and resubscribes with `since` so nothing is missed; when the
/// server cannot resume (`resync_required`), it marks the gap in the list and subscribes
/// again with `snapshot: true`, so that the table's current rows follow the mark (plain
/// changes only, if the snapshot is refused, e.g. `snapshot_too_large`). When the server has auth on, a token
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
        td.gap { color: #cf222e; font-style: italic; }
        .snapshot { color: #57606a; }
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
        const tokenEl = document.getElementById("token");
        let socket = null, lastCursor = null, subscription = null, retry = 500, counter = 0, usedToken = "";
        let reconnectTimer = null, waitingForUser = false, gap = false, openedAt = 0;
        // After a gap: the next subscription asks for the table's current rows.
        let wantSnapshot = false, snapshotCursor = null, snapshotShown = [], snapshotMore = 0, snapshotNote = "";
        // Current rows shown after a gap at most (the list keeps 200 entries in all).
        const snapshotRowsShown = 150;
        const params = new URLSearchParams(location.search);
        tokenEl.value = params.get("access_token") || "";
        // Not left in the address bar, history and bookmarks.
        if (params.has("access_token")) history.replaceState(null, "", location.pathname);

        function currentToken() { return tokenEl.value.trim(); }

        function setStatus(text) { statusEl.textContent = text; }

        function subscribe() {
          if (!socket || socket.readyState !== WebSocket.OPEN || !subscription) return;
          if (!subscription.table) { setStatus("enter a table, then press subscribe"); return; }
          const message = { type: "subscribe", id: subscription.id, table: subscription.table };
          if (subscription.filter) message.filter = subscription.filter;
          // Unfiltered, a TRUNCATE reaches us too (a filtered subscription never gets one).
          else message.events = ["INSERT", "UPDATE", "DELETE", "TRUNCATE"];
          if (lastCursor) message.since = lastCursor;
          else if (wantSnapshot) {
            message.snapshot = true;
            // Asked again (a drop, a retry, a new token): the rows of the last attempt go.
            for (const tr of snapshotShown) tr.remove();
            snapshotShown = []; snapshotMore = 0;
          }
          socket.send(JSON.stringify(message));
        }

        function show(message) {
          const tr = document.createElement("tr");
          const op = document.createElement("td"); op.textContent = message.op; op.className = message.op;
          if (message.op === "snapshot") tr.className = "snapshot";
          const time = document.createElement("td"); time.textContent = message.commit_time || "";
          const row = document.createElement("td"); row.className = "row";
          let text;
          if (message.op === "TRUNCATE") {
            text = "table truncated: every row removed";
          } else {
            text = JSON.stringify(message.new || message.old || {});
            // An UPDATE's old values where they differ (a changed key; all of them with
            // REPLICA IDENTITY FULL), and the columns left out of `new` (unchanged TOAST values).
            const old = message.op === "UPDATE" && message.old ? message.old : null;
            if (old && message.new && Object.keys(old).some(k => JSON.stringify(old[k]) !== JSON.stringify(message.new[k]))) {
              text += "  (was " + JSON.stringify(old) + ")";
            }
            if (Array.isArray(message.unchanged) && message.unchanged.length) text += "  (unchanged: " + message.unchanged.join(", ") + ")";
          }
          // A few KB per row: 200 rows of multi-megabyte values would hold gigabytes in the page.
          const most = 4096;
          if (text.length > most) text = text.slice(0, most) + "… (" + (text.length - most) + " more characters)";
          row.textContent = text;
          tr.append(op, time, row);
          rows.prepend(tr);
          while (rows.children.length > 200) rows.lastChild.remove();
          return tr;
        }

        // Changes were missed at this point of the list (the resume window no longer had them).
        function markGap(reason) {
          gap = true;
          const tr = document.createElement("tr");
          const td = document.createElement("td"); td.colSpan = 3; td.className = "gap";
          td.textContent = "changes missed here (" + reason + "): the rows below are older";
          tr.append(td);
          rows.prepend(tr);
        }

        // The server cannot resume from our cursor: mark the gap, then subscribe afresh with
        // the table's current rows.
        function resync(reason) {
          lastCursor = null;
          wantSnapshot = true; snapshotShown = []; snapshotNote = "";
          markGap(reason);
          subscribe();
        }

        function scheduleReconnect() {
          clearTimeout(reconnectTimer);
          // Jittered, so that the tabs a server restart dropped do not all come back at once.
          reconnectTimer = setTimeout(connect, retry / 2 + Math.random() * retry / 2);
          retry = Math.min(retry * 2, 10000);
        }

        function connect() {
          reconnectTimer = null;
          // Unopened until this socket opens: an earlier socket's long life must not reset
          // the backoff of attempts that fail to connect.
          openedAt = 0;
          usedToken = currentToken();
          const query = usedToken ? "?access_token=" + encodeURIComponent(usedToken) : "";
          const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws" + query;
          const ws = new WebSocket(url);
          socket = ws;
          ws.onopen = () => { openedAt = Date.now(); setStatus("connected"); subscribe(); };
          ws.onmessage = (event) => {
            if (ws !== socket) return;
            const message = JSON.parse(event.data);
            // Only the current subscription's messages: an earlier one's may still be in flight.
            const mine = !!subscription && (message.id === subscription.id
              || (Array.isArray(message.ids) && message.ids.includes(subscription.id)));
            switch (message.type) {
              case "subscribed":
                if (!mine) return;
                // The backoff is not reset here: a server that accepts the subscription and
                // then closes every time would be retried twice a second for ever. It is reset
                // by a change, a complete snapshot, or a socket that lasted 10 s.
                setStatus("subscribed to " + subscription.table + (gap ? " (some changes were missed: see the marked row)" : "") + snapshotNote);
                // While the current rows arrive, a drop must ask for them again (no `since`):
                // the cursor is adopted once they are all here.
                if (wantSnapshot) snapshotCursor = message.cursor;
                else if (!lastCursor) lastCursor = message.cursor;
                break;
              case "change":
                if (!mine) return;
                retry = 500;
                show(message);
                lastCursor = message.cursor;
                break;
              case "snapshot":
                if (!mine) return;
                for (const row of message.rows || []) {
                  if (snapshotShown.length < snapshotRowsShown) {
                    snapshotShown.push(show({ op: "snapshot", commit_time: "current row", new: row }));
                  } else {
                    snapshotMore += 1;
                  }
                }
                if (message.done) {
                  wantSnapshot = false;
                  retry = 500;
                  if (!lastCursor) lastCursor = snapshotCursor;
                  if (snapshotMore > 0) {
                    const tr = document.createElement("tr"); tr.className = "snapshot";
                    const td = document.createElement("td"); td.colSpan = 3;
                    td.textContent = "… and " + snapshotMore + " more current rows, not shown";
                    tr.append(td);
                    rows.prepend(tr);
                    snapshotShown.push(tr);
                  }
                  setStatus("subscribed to " + subscription.table + ": the table's current rows (up to " + snapshotRowsShown + ") follow the marked gap");
                }
                break;
              case "resync_required":
                if (!mine) return;
                resync("the resume window no longer had them");
                break;
              case "error":
                if (message.id !== undefined && !mine) return;
                setStatus("error " + message.code + ": " + message.message);
                if (mine && message.code === "invalid_message" && lastCursor && message.message.includes("ahead of this database")) {
                  // The cursor is from another database (a restarted demo cluster): start afresh.
                  resync("the cursor was from another database");
                } else if (mine && wantSnapshot && !lastCursor && message.code !== "internal") {
                  // The snapshot was refused (snapshot_too_large, or no database behind the
                  // server): the changes from now on, without the current rows.
                  wantSnapshot = false;
                  snapshotNote = "; current rows not shown: " + message.code;
                  subscribe();
                } else if (mine && message.code === "internal") {
                  const delay = retry, id = subscription.id; retry = Math.min(retry * 2, 10000);
                  // Only if this is still the socket and subscription it was for.
                  setTimeout(() => { if (ws === socket && subscription.id === id) subscribe(); }, delay);
                }
                break;
            }
            cursorEl.textContent = lastCursor || "none";
          };
          ws.onclose = (event) => {
            if (ws !== socket) return;
            if (event.code === 1008 || event.code === 1009) {
              // Trying again would meet the same answer: wait for the user.
              waitingForUser = true;
              setStatus("disconnected (" + event.code + "): " + (event.code === 1008
                ? "the token expired or was refused; paste a new one and press subscribe"
                : "a message was too big (a very long filter?); change it and press subscribe"));
              return;
            }
            if (openedAt > 0 && Date.now() - openedAt >= 10000) retry = 500;
            const hint = event.code === 1006 ? " (refused? a missing or bad token gets 401; a page origin the server does not allow, 403: --allowed-origins)" : "";
            setStatus("disconnected (" + event.code + ")" + hint + ", reconnecting…");
            scheduleReconnect();
          };
        }

        document.getElementById("form").addEventListener("submit", (event) => {
          event.preventDefault();
          const table = document.getElementById("table").value.trim();
          const filter = document.getElementById("filter").value.trim();
          // The same table and filter (a new token, say): keep the cursor and rows, so that the
          // new subscription resumes where the last one stopped.
          const same = !!subscription && subscription.table === table && subscription.filter === filter;
          if (subscription && socket && socket.readyState === WebSocket.OPEN) {
            socket.send(JSON.stringify({ type: "unsubscribe", id: subscription.id }));
          }
          if (!same) { lastCursor = null; gap = false; wantSnapshot = false; snapshotShown = []; snapshotNote = ""; rows.replaceChildren(); }
          subscription = { id: "s" + (++counter), table, filter };
          if (waitingForUser || currentToken() !== usedToken || !socket || socket.readyState !== WebSocket.OPEN) {
            // Connect now, with the token as it is: not after a pending backoff.
            waitingForUser = false;
            retry = 500;
            clearTimeout(reconnectTimer);
            const old = socket;
            socket = null;
            if (old) old.close();
            connect();
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
