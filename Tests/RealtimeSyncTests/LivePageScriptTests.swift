import Foundation
import RealtimeSync
import Testing

/// The live page's script, run by Node.js against a stand-in for the DOM and `WebSocket`
/// (the harness below): what it sends and shows when the server asks it to resync, how it
/// shows TRUNCATE, UPDATEs and huge values, and how its reconnects back off. The
/// browser test (`LivePageBrowserTests`) covers the page as a whole in Chromium; a resync
/// cannot be provoked there without a server that drops changes on purpose.
@Suite("Live page script (Node.js)")
struct LivePageScriptTests {
    /// Node.js: NODE (when set), else the first `node` or `nodejs` on the PATH (as `.ci/run`
    /// looks for it before installing Debian's).
    static let node: String? = {
        let environment = ProcessInfo.processInfo.environment
        let onPath = (environment["PATH"] ?? "/usr/local/bin:/usr/bin:/bin").split(separator: ":").flatMap { dir in
            ["node", "nodejs"].map { "\(dir)/\($0)" }
        }
        let candidates = [environment["NODE"]].compactMap { $0 } + onPath
        return candidates.first { FileManager.default.isExecutableFile(atPath: $0) }
    }()

    @Test("after resync_required the page subscribes with snapshot: true, shows the current rows (150 at most) once each, adopts the cursor only when they are all in, asks again after a drop, and falls back to plain changes, saying why, when the snapshot is refused")
    func resyncTakesASnapshot() async throws {
        let node = try #require(Self.node, "Node.js is not installed (.ci/run installs Debian's nodejs; or set NODE)")
        let html = LivePage.html(table: "public.t")
        let start = try #require(html.range(of: "<script>"))
        let end = try #require(html.range(of: "</script>"))
        let script = String(html[start.upperBound..<end.lowerBound])
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("live-page-script-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: folder) }
        let page = folder.appendingPathComponent("page.js")
        let harnessFile = folder.appendingPathComponent("harness.js")
        try script.write(to: page, atomically: true, encoding: .utf8)
        try Self.harness.write(to: harnessFile, atomically: true, encoding: .utf8)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: node)
        process.arguments = [harnessFile.path, page.path]
        let output = Pipe()
        process.standardOutput = output
        process.standardError = output
        // Read and waited for on a Dispatch thread, not on a cooperative one.
        let text = try await withCheckedThrowingContinuation { (c: CheckedContinuation<String, any Error>) in
            DispatchQueue(label: "LivePageScriptTests.node").async {
                do {
                    try process.run()
                    let text = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
                    process.waitUntilExit()
                    c.resume(returning: text)
                } catch {
                    c.resume(throwing: error)
                }
            }
        }
        #expect(process.terminationStatus == 0, "\(text)")
        #expect(text.components(separatedBy: "\n").filter { $0.hasPrefix("ok ") }.count == 19, "\(text)")
    }

    /// A stand-in for the DOM and `WebSocket`, and the steps it checks (each prints `ok` or `FAIL`).
    static let harness = #"""
const fs = require("fs");
const src = fs.readFileSync(process.argv[2], "utf8");
function el(id) {
  return { id, value: id === "table" ? "public.t" : "", textContent: "", children: [], className: "", colSpan: 0, parent: null,
    listeners: {}, addEventListener(t, f) { this.listeners[t] = f; },
    prepend(x) { x.parent = this; this.children.unshift(x); }, append(...xs) { for (const x of xs) { x.parent = this; this.children.push(x); } },
    remove() { if (this.parent) { const i = this.parent.children.indexOf(this); if (i >= 0) this.parent.children.splice(i, 1); this.parent = null; } },
    replaceChildren() { this.children = []; }, get lastChild() { return this.children[this.children.length - 1]; } };
}
const els = {}; ["status", "cursor", "changes", "token", "table", "filter", "form"].forEach(i => els[i] = el(i));
global.document = { getElementById: (i) => els[i], createElement: (t) => el(t) };
global.location = { search: "", protocol: "http:", host: "h", pathname: "/" };
global.history = { replaceState() {} };
const sockets = [];
global.WebSocket = class { constructor(url) { this.url = url; this.sent = []; this.readyState = 1; sockets.push(this); }
  send(m) { this.sent.push(JSON.parse(m)); } close() {} };
WebSocket.OPEN = 1;
const timers = [], delays = []; global.setTimeout = (f, d) => { timers.push(f); delays.push(d); return timers.length; }; global.clearTimeout = () => {};
eval(src);
const last = (a) => a[a.length - 1];
const snapshotRows = () => els.changes.children.filter(r => r.className === "snapshot").length;
const ws = sockets[0];
const recv = (m) => ws.onmessage({ data: JSON.stringify(m) });
ws.onopen();
let ok = true; const check = (c, what) => { if (!c) { ok = false; console.log("FAIL", what); } else console.log("ok  ", what); };
check(ws.sent.length === 1 && !ws.sent[0].snapshot && !ws.sent[0].since, "first subscribe: no snapshot, no since");
check(JSON.stringify(ws.sent[0].events) === JSON.stringify(["INSERT", "UPDATE", "DELETE", "TRUNCATE"]), "unfiltered: TRUNCATE asked for too");
const id = ws.sent[0].id;
recv({ type: "subscribed", id, cursor: "c1" });
recv({ type: "change", ids: [id], op: "INSERT", cursor: "c2", new: { id: 1 } });
recv({ type: "resync_required", id });
check(ws.sent.length === 2 && ws.sent[1].snapshot === true && !ws.sent[1].since, "after resync: subscribe with snapshot, no since");
recv({ type: "subscribed", id, cursor: "c9" });
check(els.cursor.textContent === "none", "cursor not adopted before the snapshot is complete");
recv({ type: "snapshot", id, rows: [{ id: 1 }, { id: 2 }], done: false });
// drop mid-snapshot: reconnect must ask for the snapshot again
ws.onclose({ code: 1006 });
timers.shift()();
const ws2 = sockets[1]; ws2.onopen();
check(ws2.sent.length === 1 && ws2.sent[0].snapshot === true && !ws2.sent[0].since, "drop mid-snapshot: resubscribe asks for the snapshot again");
check(snapshotRows() === 0, "the partial snapshot's rows are taken away before asking again");
const id2 = ws2.sent[0].id;
const recv2 = (m) => ws2.onmessage({ data: JSON.stringify(m) });
recv2({ type: "subscribed", id: id2, cursor: "c10" });
recv2({ type: "snapshot", id: id2, rows: [{ id: 1 }, { id: 2 }, { id: 3 }], done: true });
check(els.cursor.textContent === "c10", "cursor adopted once the snapshot is done");
check(snapshotRows() === 3, "each current row shown once (" + snapshotRows() + ")");
recv2({ type: "change", ids: [id2], op: "UPDATE", cursor: "c11", new: { id: 3 } });
check(els.cursor.textContent === "c11", "changes after the snapshot move the cursor");
// another resync with a big table: at most 150 rows shown, then one summary row
recv2({ type: "resync_required", id: id2 });
check(last(ws2.sent).snapshot === true, "second resync asks for a snapshot");
recv2({ type: "subscribed", id: id2, cursor: "c30" });
const many = Array.from({ length: 400 }, (_, i) => ({ id: i }));
recv2({ type: "snapshot", id: id2, rows: many, done: true });
const newestGap = els.changes.children.findIndex(r => r.children.some(td => td.className === "gap"));
const above = els.changes.children.slice(0, newestGap).filter(r => r.className === "snapshot").length;
check(newestGap === 151 && above === 151, "a large snapshot shows 150 rows and a summary, and its gap mark stays (" + above + " above the mark at " + newestGap + ")");
// a third resync; snapshot refused
recv2({ type: "resync_required", id: id2 });
recv2({ type: "error", id: id2, code: "snapshot_too_large", message: "too many rows (snapshotMaxRows=10000)" });
const plain = last(ws2.sent);
check(!plain.snapshot && !plain.since, "refused snapshot: plain subscribe follows");
recv2({ type: "subscribed", id: id2, cursor: "c40" });
check(els.cursor.textContent === "c40", "plain subscription adopts its cursor");
check(els.status.textContent.includes("current rows not shown: snapshot_too_large"), "the refusal is told in the status: " + els.status.textContent);
const shown = () => els.changes.children[0].children[2].textContent;
recv2({ type: "change", ids: [id2], op: "TRUNCATE", cursor: "c41", new: null, old: null });
check(shown().includes("truncated"), "a TRUNCATE is shown as one: " + shown());
recv2({ type: "change", ids: [id2], op: "INSERT", cursor: "c42", new: { id: 5, big: "x".repeat(1000000) } });
check(shown().length < 5000 && shown().includes("more characters"), "a huge value is cut (" + shown().length + " characters shown)");
recv2({ type: "change", ids: [id2], op: "UPDATE", cursor: "c43", new: { id: 2, s: "paid" }, old: { id: 1 }, unchanged: ["notes"] });
check(shown().includes('"id":1') && shown().includes("unchanged: notes"), "an UPDATE that changed the key shows the old key and the unchanged columns: " + shown());
// A server that accepts each subscription, then closes with 1013: the waits grow.
const before = delays.length;
for (let i = 0; i < 6; i++) {
  const s = last(sockets);
  s.onmessage({ data: JSON.stringify({ type: "subscribed", id: last(s.sent).id, cursor: "c50" }) });
  s.onclose({ code: 1013 });
  timers.shift()();
  last(sockets).onopen();
}
const waits = delays.slice(before);
check(waits.length === 6 && Math.max(...waits) >= 4000, "accepted, then closed, again and again: the waits grow (" + waits.map(Math.round).join(", ") + " ms)");
// A socket that lived a minute resets the backoff when it closes; attempts that then fail
// to connect (never opened) back off again, whatever the earlier socket's age.
const realNow = Date.now; let fake = realNow();
Date.now = () => fake;
const lived = last(sockets);
fake += 60000;
const afterLong = delays.length;
lived.onclose({ code: 1001 });
for (let i = 0; i < 6; i++) { timers.shift()(); fake += 100; last(sockets).onclose({ code: 1006 }); }
Date.now = realNow;
const failing = delays.slice(afterLong);
check(failing.length === 7 && failing[0] <= 500 && Math.max(...failing) >= 4000, "after a long-lived socket, failed connects back off (" + failing.map(Math.round).join(", ") + " ms)");
process.exit(ok ? 0 : 1);
"""#
}
