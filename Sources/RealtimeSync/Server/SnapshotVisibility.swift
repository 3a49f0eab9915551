/// Which committed transactions a Postgres snapshot sees: `pg_current_snapshot()`'s
/// `xmin:xmax:xip_list`, with 64-bit (epoch-extended) transaction ids.
///
/// For a transaction that committed (every transaction the change stream carries did):
/// - `xid < xmin`: it had finished before the snapshot was taken: visible;
/// - `xid >= xmax`: it had not finished (running, or not started): not visible. `xmax` is one
///   past the newest *finished* id, so transactions running with ids at or above it are not
///   listed in `xip`;
/// - `xid` in `xip`: it was still running: not visible;
/// - otherwise (`xmin <= xid < xmax`, not in `xip`): it had finished: visible.
///
/// This is Postgres's own rule (`XidInMVCCSnapshot`) for top-level transaction ids, which is
/// what pgoutput's Begin message and `pg_current_snapshot()` both carry.
public struct SnapshotVisibility: Sendable, Hashable, CustomStringConvertible {
    /// The oldest transaction id still running when the snapshot was taken.
    public let xmin: UInt64
    /// One past the newest transaction id that had finished when the snapshot was taken: ids at
    /// or above it had not finished (running ones among them are not in `xip`).
    public let xmax: UInt64
    /// The ids running when the snapshot was taken (`xmin <= xid < xmax`).
    public let xip: Set<UInt64>

    /// Creates a snapshot description from 64-bit transaction ids.
    public init(xmin: UInt64, xmax: UInt64, xip: some Sequence<UInt64> = []) {
        self.xmin = xmin
        self.xmax = xmax
        self.xip = Set(xip)
    }

    /// Parses `pg_current_snapshot()`'s text form `xmin:xmax:xip,xip,…` (the list may be empty).
    public init?(parsing text: some StringProtocol) {
        let parts = text.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
        guard parts.count == 3, let xmin = UInt64(parts[0]), let xmax = UInt64(parts[1]), xmin <= xmax else { return nil }
        var xip: [UInt64] = []
        for item in parts[2].split(separator: ",", omittingEmptySubsequences: false) where !parts[2].isEmpty {
            guard let xid = UInt64(item) else { return nil }
            xip.append(xid)
        }
        self.init(xmin: xmin, xmax: xmax, xip: xip)
    }

    /// `xmin:xmax:xip,…`, as Postgres prints it.
    public var description: String {
        "\(xmin):\(xmax):" + xip.sorted().map(String.init).joined(separator: ",")
    }

    /// Whether a committed transaction with 64-bit id `xid` is visible in the snapshot.
    public func isVisible(xid: UInt64) -> Bool {
        if xid < xmin { return true }
        if xid >= xmax { return false }
        return !xip.contains(xid)
    }

    /// Whether a committed transaction with 32-bit id `xid` (as pgoutput sends it) is visible:
    /// the id is first widened to 64 bits with `widen(_:)`.
    public func isVisible(xid: UInt32) -> Bool { isVisible(xid: widen(xid)) }

    /// The 64-bit id whose low 32 bits are `xid` and that lies within 2^31 of `xmax`.
    ///
    /// Postgres keeps every id that can still appear within 2^31 of the next id to be
    /// assigned (wraparound protection), and a change that reaches the server while a
    /// snapshot is being handed over belongs to a transaction whose id is less than that far
    /// from the snapshot's `xmax`, so this is its real 64-bit id, across epoch boundaries too.
    public func widen(_ xid: UInt32) -> UInt64 {
        let distance = Int64(Int32(bitPattern: xid &- UInt32(truncatingIfNeeded: xmax)))
        let widened = Int64(bitPattern: xmax) &+ distance
        return widened < 0 ? UInt64(xid) : UInt64(widened)
    }
}
