import Testing

@testable import Scheduler

@Suite("TimerQueue")
struct TimerQueueTests {
    @Test("pops in deadline order, ties by id")
    func order() {
        var q = TimerQueue()
        q.insert(3, deadline: 30)
        q.insert(1, deadline: 10)
        q.insert(2, deadline: 10)
        q.insert(0, deadline: 50)
        #expect(q.popDue(now: 9) == nil)
        #expect(q.popDue(now: 100)?.id == 1)
        #expect(q.popDue(now: 100)?.id == 2)
        #expect(q.popDue(now: 100)?.id == 3)
        #expect(q.popDue(now: 100)?.id == 0)
        #expect(q.isEmpty)
    }

    @Test("random inserts, updates and removes keep the heap valid and match a reference")
    func randomized() {
        var rng = SplitMix64(state: 7)
        var q = TimerQueue()
        var reference: [UInt32: Int64] = [:]
        for step in 0..<20_000 {
            let id = UInt32(rng.next() % 500)
            switch rng.next() % 4 {
            case 0, 1:
                let d = Int64(rng.next() % 10_000)
                q.insert(id, deadline: d)
                reference[id] = d
            case 2:
                #expect(q.remove(id) == (reference.removeValue(forKey: id) != nil))
            default:
                let now = Int64(step / 2)
                if let e = q.popDue(now: now) {
                    let best = reference.min { ($0.value, $0.key) < ($1.value, $1.key) }!
                    #expect(e.id == best.key && e.deadline == best.value)
                    #expect(e.deadline <= now, "popped \(e.id) due at \(e.deadline) before it was due (now \(now))")
                    reference[e.id] = nil
                } else {
                    // Nothing popped: nothing in the reference may be due (due means deadline <= now).
                    let due = reference.filter { $0.value <= now }.map { "\($0.key)@\($0.value)" }.sorted()
                    #expect(due.isEmpty, "popDue(now: \(now)) returned nil while these were due: \(due.prefix(5))")
                }
            }
            if step % 1000 == 0 { #expect(q.isValid()) }
        }
        #expect(q.isValid())
        #expect(q.count == reference.count)
    }

    @Test("remove frees the entry at once")
    func removeFrees() {
        var q = TimerQueue()
        for i in 0..<10_000 { q.insert(UInt32(i), deadline: Int64(i)) }
        for i in stride(from: 0, to: 10_000, by: 2) { q.remove(UInt32(i)) }
        #expect(q.count == 5_000)
        #expect(q.isValid())
        for i in stride(from: 1, to: 10_000, by: 2) { q.remove(UInt32(i)) }
        #expect(q.isEmpty)
        #expect(q.entries.capacity == 0)
    }
}
