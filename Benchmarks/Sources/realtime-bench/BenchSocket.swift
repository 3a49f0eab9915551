import Foundation
import NIOCore
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Counters every thread adds to (once per read, not per message, so the threads don't fight
/// over one cache line per change).
final class GlobalCounters: Sendable {
    let subscribedSockets = Atomic<Int>(0)
    let failedSockets = Atomic<Int>(0)
    let closedSockets = Atomic<Int>(0)
    let changes = Atomic<Int>(0)
    let firstError = Mutex<String?>(nil)

    func fail(_ message: String) {
        failedSockets.add(1, ordering: .relaxed)
        firstError.withLock { if $0 == nil { $0 = message } }
    }
}

/// What the sockets of one event loop saw. Touched only on that loop (its handlers run
/// there), read at the end through `loop.submit`.
final class LoopStats: @unchecked Sendable {
    // @unchecked: confined to one event loop; the main task reads it via EventLoop.submit.
    /// Latency histogram in 10 µs buckets up to 10 s (commit_time → receive).
    /// (Raw counts, allocated once for the process: one increment per message, without the
    /// exclusivity and uniqueness checks of an array in a class.)
    let commitCounts = UnsafeMutablePointer<UInt32>.allocate(capacity: Histogram.buckets)
    var commitLatency: [UInt32] { Array(UnsafeBufferPointer(start: commitCounts, count: Histogram.buckets)) }
    /// Same, from the inserter's client_ts column (insert issued → receive).
    let clientCounts = UnsafeMutablePointer<UInt32>.allocate(capacity: Histogram.buckets)
    var clientLatency: [UInt32] { Array(UnsafeBufferPointer(start: clientCounts, count: Histogram.buckets)) }
    var negativeCommitLatency = 0
    /// The last commit date seen (yyyymmdd) and its days since the epoch.
    var dayCache: (key: Int64, days: Int64) = (-1, 0)
    var changes = 0
    var duplicates = 0
    var unparsable = 0
    var errors = 0
    var lastReceive: Int64 = 0
    var closeCodes: [UInt16: Int] = [:]
    var sockets: [BenchSocket] = []

    init() {
        commitCounts.initialize(repeating: 0, count: Histogram.buckets)
        clientCounts.initialize(repeating: 0, count: Histogram.buckets)
    }
}

enum Histogram {
    static let bucketMicros: Int64 = 10
    static let buckets = 1_000_000

    static func index(_ micros: Int64) -> Int { Int(min(max(micros, 0) / bucketMicros, Int64(buckets - 1))) }

    /// Merged percentiles in microseconds.
    static func percentiles(_ histograms: [[UInt32]], _ wanted: [Double]) -> (count: Int, values: [Double], max: Double) {
        var merged = [UInt64](repeating: 0, count: buckets)
        for histogram in histograms { for i in 0..<buckets where histogram[i] != 0 { merged[i] += UInt64(histogram[i]) } }
        let total = merged.reduce(0, +)
        guard total > 0 else { return (0, wanted.map { _ in .nan }, .nan) }
        var values: [Double] = []
        for p in wanted {
            let rank = UInt64((Double(total) * p).rounded(.up))
            var seen: UInt64 = 0
            for i in 0..<buckets {
                seen += merged[i]
                if seen >= max(rank, 1) { values.append(Double(Int64(i) * bucketMicros + bucketMicros / 2)); break }
            }
        }
        let top = merged.lastIndex { $0 != 0 }!
        return (Int(total), values, Double(Int64(top) * bucketMicros + bucketMicros / 2))
    }
}

/// Wall-clock microseconds since the epoch (the clock Postgres stamps commit_time with).
@inline(__always) func wallMicros() -> Int64 {
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME, &ts)
    return Int64(ts.tv_sec) * 1_000_000 + Int64(ts.tv_nsec) / 1000
}

/// One benchmark WebSocket: writes the upgrade request, subscribes, then reads frames and
/// decodes only what the measurement needs (`"type"`, `commit_time`, `new.id`, `client_ts`).
/// Server frames are unmasked; frames it sends are masked as RFC 6455 requires.
final class BenchSocket: ChannelInboundHandler, @unchecked Sendable {
    // @unchecked: a handler lives on its channel's event loop.
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    enum State { case handshake, subscribing(Int), subscribed, closed }

    private let request: ByteBuffer
    private let subscribeFrames: [ByteBuffer]
    private let stats: LoopStats
    private let counters: GlobalCounters
    private var state = State.handshake
    private var pending: ByteBuffer?
    private var fragments: [UInt8] = []
    /// Bit i set: the row with id i+1 arrived.
    private(set) var seen: [UInt64]
    private(set) var received = 0

    init(request: ByteBuffer, subscribeFrames: [ByteBuffer], expectedRows: Int, stats: LoopStats, counters: GlobalCounters) {
        self.request = request
        self.subscribeFrames = subscribeFrames
        self.stats = stats
        self.counters = counters
        self.seen = [UInt64](repeating: 0, count: expectedRows / 64 + 1)
    }

    var isSubscribed: Bool { if case .subscribed = state { return true } else { return false } }

    func channelActive(context: ChannelHandlerContext) {
        stats.sockets.append(self)
        context.writeAndFlush(wrapOutboundOut(request), promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        switch state {
        case .closed: break
        case .handshake, .subscribing: counters.fail("connection closed before every subscription was confirmed")
        case .subscribed: counters.closedSockets.add(1, ordering: .relaxed)
        }
        state = .closed
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if case .subscribed = state { counters.closedSockets.add(1, ordering: .relaxed) } else if case .closed = state {} else {
            counters.fail("socket error: \(error)")
        }
        state = .closed
        context.close(promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        if pending == nil { pending = incoming } else { pending!.writeBuffer(&incoming) }
        let now = wallMicros()
        if case .handshake = state {
            guard readHandshake(context: context) else { return }
        }
        let before = stats.changes
        readFrames(context: context, now: now)
        let got = stats.changes - before
        if got > 0 {
            counters.changes.add(got, ordering: .relaxed)
            stats.lastReceive = now
        }
    }

    /// The 101 response head; false while it is incomplete or when it was refused.
    private func readHandshake(context: ChannelHandlerContext) -> Bool {
        guard let view = pending?.readableBytesView, let end = view.firstRange(of: [13, 10, 13, 10]) else { return false }
        let head = String(decoding: view[view.startIndex..<end.lowerBound], as: UTF8.self)
        pending!.moveReaderIndex(to: end.upperBound)
        let statusLine = head.prefix { $0 != "\r" }
        guard statusLine.split(separator: " ").dropFirst().first == "101" else {
            let body = pending.map { String(buffer: $0) } ?? ""
            counters.fail("upgrade refused: \(statusLine) \(body.prefix(200))")
            state = .closed
            context.close(promise: nil)
            return false
        }
        state = .subscribing(0)
        for frame in subscribeFrames { context.write(wrapOutboundOut(frame), promise: nil) }
        context.flush()
        return true
    }

    /// Parses every complete frame in `pending` over one raw view of its bytes, then moves the
    /// reader index once: no ByteBuffer copy, slice or write-back per frame (the per-frame
    /// buffer traffic was most of this client's own CPU at 1 M messages/s, and every cycle the
    /// client spends is taken from the server it measures on a shared machine).
    private func readFrames(context: ChannelHandlerContext, now: Int64) {
        guard var buffer = pending else { return }
        pending = nil
        var closed = false
        let consumed = buffer.withUnsafeReadableBytes { raw -> Int in
            var offset = 0
            while raw.count - offset >= 2 {
                let b0 = raw[offset], b1 = raw[offset + 1]
                var header = 2
                var length = Int(b1 & 0x7F)
                if length == 126 {
                    guard raw.count - offset >= 4 else { break }
                    length = Int(raw[offset + 2]) << 8 | Int(raw[offset + 3]); header = 4
                } else if length == 127 {
                    guard raw.count - offset >= 10 else { break }
                    length = 0
                    for i in 2..<10 { length = length << 8 | Int(raw[offset + i]) }
                    header = 10
                }
                let masked = b1 & 0x80 != 0
                if masked { header += 4 }
                guard raw.count - offset >= header + length else { break }
                let frameStart = offset
                offset += header + length
                var unmasked: [UInt8] = []
                let payload = UnsafeRawBufferPointer(rebasing: raw[(frameStart + header)..<offset])
                if masked {
                    // Servers never mask; unmask a copy anyway rather than misread one that does.
                    unmasked = Array(payload)
                    for i in unmasked.indices { unmasked[i] ^= raw[frameStart + header - 4 + (i & 3)] }
                }
                let fin = b0 & 0x80 != 0
                let opcode = b0 & 0x0F
                func withPayload(_ body: (UnsafeRawBufferPointer) -> Void) {
                    if masked { unmasked.withUnsafeBytes(body) } else { body(payload) }
                }
                switch opcode {
                case 0x1, 0x0:
                    if fin && fragments.isEmpty {
                        withPayload { handleText($0, context: context, now: now) }
                    } else {
                        withPayload { fragments.append(contentsOf: $0) }
                        if fin {
                            let message = fragments
                            fragments = []
                            message.withUnsafeBytes { handleText($0, context: context, now: now) }
                        }
                    }
                case 0x9: // ping: answer with a pong carrying the same payload
                    withPayload { context.writeAndFlush(wrapOutboundOut(Frames.masked(opcode: 0xA, payload: Array($0))), promise: nil) }
                case 0x8:
                    var code: UInt16 = 1005
                    withPayload { if $0.count >= 2 { code = UInt16($0[0]) << 8 | UInt16($0[1]) } }
                    stats.closeCodes[code, default: 0] += 1
                    if case .subscribed = state { counters.closedSockets.add(1, ordering: .relaxed) } else { counters.fail("closed by the server with \(code) before subscribing") }
                    state = .closed
                    context.writeAndFlush(wrapOutboundOut(Frames.masked(opcode: 0x8, payload: [UInt8(code >> 8), UInt8(code & 0xFF)])), promise: nil)
                    context.close(promise: nil)
                    closed = true
                    return offset
                default: break
                }
            }
            return offset
        }
        buffer.moveReaderIndex(forwardBy: consumed)
        if closed || buffer.readableBytes == 0 { return }
        if buffer.readerIndex > 65536 { buffer.discardReadBytes() }
        pending = buffer
    }

    private func handleText(_ bytes: UnsafeRawBufferPointer, context: ChannelHandlerContext, now: Int64) {
        guard let typeEnd = Scan.valueStart(bytes, after: Scan.typeKey, from: 0) else { stats.unparsable += 1; return }
        // The value starts with a quote; compare the first letters of change / subscribed / error.
        let first = typeEnd + 1 < bytes.count ? bytes[typeEnd + 1] : 0
        if first == UInt8(ascii: "c") {
            handleChange(bytes, now: now)
        } else if Scan.hasPrefix(bytes, at: typeEnd, "\"subscribed\"") {
            if case .subscribing(let count) = state {
                if count + 1 == subscribeFrames.count {
                    state = .subscribed
                    counters.subscribedSockets.add(1, ordering: .relaxed)
                } else {
                    state = .subscribing(count + 1)
                }
            }
        } else if Scan.hasPrefix(bytes, at: typeEnd, "\"error\"") {
            stats.errors += 1
            let text = String(decoding: bytes, as: UTF8.self)
            if case .subscribed = state {} else {
                counters.fail("error answering subscribe: \(text.prefix(300))")
                state = .closed
                context.close(promise: nil)
            }
        }
    }

    private func handleChange(_ bytes: UnsafeRawBufferPointer, now: Int64) {
        stats.changes += 1
        if let at = Scan.valueStart(bytes, after: Scan.commitTimeKey, from: 0), let commit = Scan.timestampMicros(bytes, at: at, dayCache: &stats.dayCache) {
            let latency = now - commit
            if latency < 0 { stats.negativeCommitLatency += 1 }
            stats.commitCounts[Histogram.index(latency)] += 1
        } else {
            stats.unparsable += 1
        }
        guard let newAt = Scan.valueStart(bytes, after: Scan.newKey, from: 0),
              let idAt = Scan.valueStart(bytes, after: Scan.idKey, from: newAt),
              let id = Scan.integer(bytes, at: idAt), id > 0 else { stats.unparsable += 1; return }
        if let tsAt = Scan.valueStart(bytes, after: Scan.clientTSKey, from: newAt), let sent = Scan.integer(bytes, at: tsAt) {
            stats.clientCounts[Histogram.index(now - Int64(sent))] += 1
        }
        let bit = id - 1
        let word = bit >> 6
        if word >= seen.count { seen.append(contentsOf: repeatElement(0, count: max(word + 1 - seen.count, seen.count))) }
        let mask = UInt64(1) << UInt64(bit & 63)
        if seen[word] & mask != 0 { stats.duplicates += 1 } else { seen[word] |= mask; received += 1 }
    }

    /// Rows with id 1...rows this socket never got.
    func missing(upTo rows: Int) -> Int {
        var have = 0
        let full = rows / 64
        for w in 0..<min(full, seen.count) { have += seen[w].nonzeroBitCount }
        if rows % 64 != 0, full < seen.count { have += (seen[full] & ((UInt64(1) << UInt64(rows % 64)) - 1)).nonzeroBitCount }
        return rows - have
    }
}

/// Cheap byte scans over one JSON text (no JSON parse).
enum Scan {
    // StaticStrings, not global arrays: passing a global array can retain it, and the client's
    // threads retaining the same arrays fight over their reference counts (`perf`, in a version
    // that parsed inside `withUnsafeReadableBytes` with array keys: swift_retain was 9 % of the
    // whole machine's samples, all from these keys).
    static let typeKey: StaticString = #""type""#
    static let commitTimeKey: StaticString = #""commit_time""#
    static let newKey: StaticString = #""new""#
    static let idKey: StaticString = #""id""#
    static let clientTSKey: StaticString = #""client_ts""#

    /// Index of the first byte of the value after `key` (skipping `:` and blanks), from `from` on.
    @inline(__always)
    static func valueStart(_ bytes: UnsafeRawBufferPointer, after key: StaticString, from: Int) -> Int? {
        guard from < bytes.count, bytes.baseAddress != nil else { return nil }
        guard let found = find(key, in: bytes, from: from) else { return nil }
        var i = found + key.utf8CodeUnitCount
        while i < bytes.count, bytes[i] == UInt8(ascii: ":") || bytes[i] == UInt8(ascii: " ") { i += 1 }
        return i < bytes.count ? i : nil
    }

    /// Finds a key (`"name"`, quotes included). memchr on the name's first letter, not on the
    /// opening quote: JSON is full of quotes, and anchoring on them cost a memcmp call per
    /// quote (`perf`: 25 % of the client's CPU at 1 M messages/s went to memcmp). Then a byte
    /// loop over the short key.
    @inline(__always)
    static func find(_ key: StaticString, in bytes: UnsafeRawBufferPointer, from: Int) -> Int? {
        let n = key.utf8CodeUnitCount
        let k = key.utf8Start
        guard n >= 2, let base = bytes.baseAddress else { return nil }
        let anchor = Int32(k[1])
        // The key starts at `start` when its anchor is at `start + 1`; the key must end in bounds.
        var start = from
        let lastStart = bytes.count - n
        while start <= lastStart {
            guard let hit = memchr(base + start + 1, anchor, lastStart - start + 1) else { return nil }
            let candidate = base.distance(to: UnsafeRawPointer(hit)) - 1
            var i = 0
            while i < n && bytes[candidate + i] == k[i] { i += 1 }
            if i == n { return candidate }
            start = candidate + 1
        }
        return nil
    }

    static func hasPrefix(_ bytes: UnsafeRawBufferPointer, at: Int, _ text: StaticString) -> Bool {
        let count = text.utf8CodeUnitCount
        guard at + count <= bytes.count else { return false }
        return memcmp(bytes.baseAddress! + at, text.utf8Start, count) == 0
    }

    /// A JSON integer (optionally quoted) at `at`.
    @inline(__always)
    static func integer(_ bytes: UnsafeRawBufferPointer, at: Int) -> Int? {
        var i = at
        if i < bytes.count, bytes[i] == UInt8(ascii: "\"") { i += 1 }
        var value = 0, digits = 0
        while i < bytes.count, bytes[i] &- 48 < 10 { value = value &* 10 &+ Int(bytes[i] &- 48); i += 1; digits += 1 }
        return digits > 0 ? value : nil
    }

    /// `"YYYY-MM-DDTHH:MM:SS[.ffffff](Z|+00:00)"` at `at` (the quote) as µs since the epoch (UTC).
    @inline(__always)
    static func timestampMicros(_ bytes: UnsafeRawBufferPointer, at: Int, dayCache: inout (key: Int64, days: Int64)) -> Int64? {
        let s = at + 1
        guard s + 19 <= bytes.count else { return nil }
        @inline(__always) func num(_ from: Int, _ count: Int) -> Int64 {
            var v: Int64 = 0
            for i in from..<(from + count) { v = v * 10 + Int64(bytes[i] &- 48) }
            return v
        }
        let year = num(s, 4), month = num(s + 5, 2), day = num(s + 8, 2)
        let hour = num(s + 11, 2), minute = num(s + 14, 2), second = num(s + 17, 2)
        var micros: Int64 = 0
        var i = s + 19
        if i < bytes.count, bytes[i] == UInt8(ascii: ".") {
            i += 1
            var digits = 0
            while i < bytes.count, bytes[i] &- 48 < 10 {
                if digits < 6 { micros = micros * 10 + Int64(bytes[i] &- 48) }
                digits += 1; i += 1
            }
            while digits < 6 { micros *= 10; digits += 1 }
        }
        // The date changes once a day: convert it with timegm only when it differs from the last one.
        let key = year * 10_000 + month * 100 + day
        if key != dayCache.key {
            var parts = tm()
            parts.tm_year = Int32(year - 1900); parts.tm_mon = Int32(month - 1); parts.tm_mday = Int32(day)
            dayCache = (key, Int64(timegm(&parts)) / 86_400)
        }
        let days = dayCache.days
        return ((days * 86_400 + hour * 3600 + minute * 60 + second) * 1_000_000) + micros
    }
}

/// Client frames (masked).
enum Frames {
    static func masked(opcode: UInt8, payload: [UInt8]) -> ByteBuffer {
        var buffer = ByteBuffer()
        buffer.reserveCapacity(payload.count + 14)
        buffer.writeInteger(0x80 | opcode)
        if payload.count < 126 {
            buffer.writeInteger(UInt8(0x80 | payload.count))
        } else if payload.count <= 0xFFFF {
            buffer.writeInteger(UInt8(0x80 | 126)); buffer.writeInteger(UInt16(payload.count))
        } else {
            buffer.writeInteger(UInt8(0x80 | 127)); buffer.writeInteger(UInt64(payload.count))
        }
        let key = (0..<4).map { _ in UInt8.random(in: 0...255) }
        buffer.writeBytes(key)
        buffer.writeBytes(payload.enumerated().map { $0.element ^ key[$0.offset & 3] })
        return buffer
    }
}
