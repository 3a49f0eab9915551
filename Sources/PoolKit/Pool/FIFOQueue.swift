/// A first-in first-out queue with O(1) amortized append/popFirst and O(n)
/// removal from the middle (used for cancelled or timed-out waiters).
struct FIFOQueue<Element> {
    private var items: [Element?] = []
    private var head = 0

    /// Number of queued elements.
    var count: Int { items.count - head }
    /// True when nothing is queued.
    var isEmpty: Bool { head == items.count }

    /// Appends at the back.
    mutating func append(_ element: Element) { items.append(element) }

    /// Puts an element in front of every other one.
    mutating func prepend(_ element: Element) {
        if head > 0 {
            head -= 1
            items[head] = element
        } else {
            items.insert(element, at: 0)
        }
    }

    /// Removes and returns the front element.
    mutating func popFirst() -> Element? {
        guard head < items.count else { return nil }
        let element = items[head]
        items[head] = nil
        head += 1
        if head == items.count {
            items.removeAll(keepingCapacity: true)
            head = 0
        } else if head >= 64 && head * 2 >= items.count {
            items.removeFirst(head)
            head = 0
        }
        return element
    }

    /// The element at a position counted from the front.
    subscript(position: Int) -> Element { items[head + position]! }

    /// Removes the element at a position counted from the front.
    @discardableResult
    mutating func remove(at position: Int) -> Element {
        if position == 0 { return popFirst()! }
        return items.remove(at: head + position)!
    }

    /// The position of the first element matching a predicate.
    func firstIndex(where predicate: (Element) -> Bool) -> Int? {
        var i = head
        while i < items.count {
            if predicate(items[i]!) { return i - head }
            i += 1
        }
        return nil
    }

    /// Removes and returns every element, front first.
    mutating func removeAll() -> [Element] {
        let all = items[head...].map { $0! }
        items.removeAll()
        head = 0
        return all
    }
}

/// A small, fast, seedable random number generator (SplitMix64), so that the
/// pool's jitter is reproducible in tests.
struct SplitMix64: RandomNumberGenerator, Sendable {
    private var state: UInt64

    /// Creates a generator from a seed.
    init(seed: UInt64) { state = seed }

    /// The next 64 random bits.
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// A uniformly distributed value in `0..<1`.
    mutating func fraction() -> Double { Double(next() >> 11) / Double(UInt64(1) << 53) }
}
