/// An indexed 4-ary min-heap of deadlines, keyed by small integer ids.
///
/// This is the scheduler's single timer queue. Every entry is an id (a job's
/// slot, or a run's slot for timeouts) with a deadline in ticks (nanoseconds
/// since the scheduler's epoch). Because the heap tracks each id's position,
/// `remove(_:)` and `update(_:deadline:)` are O(log n) and free the entry at
/// once: a cancelled job leaves nothing behind in the queue.
///
/// Ties are broken by id, so the order is deterministic.
///
/// Four children per node, not two: every due job is popped and re-inserted,
/// and with 10k-100k entries a pop is a walk from the root to a leaf whose
/// cost is mostly the memory each level touches. A 4-ary heap has half the
/// levels, and a node's four children (16 bytes each) share one cache line.
struct TimerQueue: Sendable {
    /// One heap entry.
    struct Entry: Sendable, Equatable {
        var deadline: Int64
        var id: UInt32

        @inline(__always)
        static func < (a: Entry, b: Entry) -> Bool {
            a.deadline < b.deadline || (a.deadline == b.deadline && a.id < b.id)
        }
    }

    private(set) var entries: [Entry] = []

    @inline(__always)
    static func parent(_ i: Int) -> Int { (i &- 1) >> 2 }

    @inline(__always)
    static func firstChild(_ i: Int) -> Int { (i << 2) &+ 1 }
    /// `positions[id]` is the index of `id` in `entries`, or -1.
    private var positions: [Int32] = []

    init() {}

    /// Number of ids in the queue.
    var count: Int { entries.count }
    /// True when nothing is queued.
    var isEmpty: Bool { entries.isEmpty }
    /// The earliest entry, if any.
    var min: Entry? { entries.first }

    /// True if `id` is queued.
    @inline(__always)
    func contains(_ id: UInt32) -> Bool {
        Int(id) < positions.count && positions[Int(id)] >= 0
    }

    /// The deadline of `id`, if queued.
    func deadline(of id: UInt32) -> Int64? {
        guard contains(id) else { return nil }
        return entries[Int(positions[Int(id)])].deadline
    }

    /// Inserts `id`, or moves it if already queued.
    mutating func insert(_ id: UInt32, deadline: Int64) {
        if contains(id) {
            update(id, deadline: deadline)
            return
        }
        let i = Int(id)
        entries.append(Entry(deadline: deadline, id: id))
        let position = Int32(entries.count - 1)
        if i == positions.count {
            positions.append(position)  // the usual growth: ids are slots, handed out in order
        } else {
            if i > positions.count { positions.append(contentsOf: repeatElement(-1, count: i - positions.count + 1)) }
            positions[i] = position
        }
        siftUp(entries.count - 1)
    }

    /// Changes the deadline of a queued `id` (inserts it if absent).
    mutating func update(_ id: UInt32, deadline: Int64) {
        guard contains(id) else { return insert(id, deadline: deadline) }
        let index = Int(positions[Int(id)])
        let old = entries[index].deadline
        entries[index].deadline = deadline
        if deadline < old { siftUp(index) } else { siftDown(index) }
    }

    /// Removes `id` if queued; returns whether it was.
    @discardableResult
    mutating func remove(_ id: UInt32) -> Bool {
        guard contains(id) else { return false }
        let index = Int(positions[Int(id)])
        positions[Int(id)] = -1
        let last = entries.removeLast()
        if index < entries.count {
            entries[index] = last
            positions[Int(last.id)] = Int32(index)
            if index > 0 && last < entries[Self.parent(index)] {
                siftUp(index)
            } else {
                siftDown(index)
            }
        }
        if entries.isEmpty { shrink() }
        return true
    }

    /// Removes and returns the earliest entry if its deadline is at or before `now`.
    mutating func popDue(now: Int64) -> Entry? {
        guard let top = entries.first, top.deadline <= now else { return nil }
        positions[Int(top.id)] = -1
        let last = entries.removeLast()
        if entries.isEmpty {
            shrink()
            return top
        }
        // Bottom-up (Floyd): move the hole at the root down to a leaf along
        // the smallest children, then sift the former last entry up from
        // there. It came from the bottom, so it rarely rises: fewer
        // comparisons than a plain sift-down (which also compares with the
        // moved entry at every level), and the pop of every due job goes
        // through here.
        let n = entries.count
        entries.withUnsafeMutableBufferPointer { e in
            positions.withUnsafeMutableBufferPointer { pos in
                var hole = 0
                while true {
                    let first = Self.firstChild(hole)
                    if first >= n { break }
                    var child = first
                    var c = e[first]
                    var j = first &+ 1
                    let end = Swift.min(first &+ 4, n)
                    while j < end {
                        if e[j] < c {
                            c = e[j]
                            child = j
                        }
                        j &+= 1
                    }
                    e[hole] = c
                    pos[Int(c.id)] = Int32(truncatingIfNeeded: hole)
                    hole = child
                }
                while hole > 0 {
                    let parent = Self.parent(hole)
                    let p = e[parent]
                    guard last < p else { break }
                    e[hole] = p
                    pos[Int(p.id)] = Int32(truncatingIfNeeded: hole)
                    hole = parent
                }
                e[hole] = last
                pos[Int(last.id)] = Int32(truncatingIfNeeded: hole)
            }
        }
        return top
    }

    /// Releases all storage once the queue is empty (after a mass cancel).
    private mutating func shrink() {
        if entries.capacity > 64 {
            entries = []
            positions = []
        }
    }

    /// Reserves room for `count` entries and ids below `count`.
    mutating func reserveCapacity(_ count: Int) {
        entries.reserveCapacity(count)
        positions.reserveCapacity(count)
    }

    /// Removes everything.
    mutating func removeAll() {
        entries = []
        positions = []
    }

    private mutating func siftUp(_ start: Int) {
        var child = start
        let item = entries[child]
        while child > 0 {
            let parent = Self.parent(child)
            let p = entries[parent]
            guard item < p else { break }
            entries[child] = p
            positions[Int(p.id)] = Int32(child)
            child = parent
        }
        entries[child] = item
        positions[Int(item.id)] = Int32(child)
    }

    private mutating func siftDown(_ start: Int) {
        var parent = start
        let item = entries[parent]
        let n = entries.count
        while true {
            let first = Self.firstChild(parent)
            if first >= n { break }
            var child = first
            var c = entries[first]
            for j in (first + 1)..<Swift.min(first + 4, n) where entries[j] < c {
                c = entries[j]
                child = j
            }
            guard c < item else { break }
            entries[parent] = c
            positions[Int(c.id)] = Int32(parent)
            parent = child
        }
        entries[parent] = item
        positions[Int(item.id)] = Int32(parent)
    }

    /// Checks the heap property and the position index (for tests).
    func isValid() -> Bool {
        for (i, e) in entries.enumerated() {
            if positions[Int(e.id)] != Int32(i) { return false }
            if i > 0 && e < entries[Self.parent(i)] { return false }
        }
        return positions.filter { $0 >= 0 }.count == entries.count
    }
}
