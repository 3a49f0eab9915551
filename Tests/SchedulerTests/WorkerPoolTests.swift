import Testing

@testable import Scheduler

@Suite("WorkerPool")
struct WorkerPoolTests {
    typealias Pool = WorkerPool<Int>

    func isRun(_ n: Pool.Next, _ v: Int) -> Bool {
        if case .run(let x) = n { return x == v }
        return false
    }

    @Test("a burst whose queue never runs empty keeps FIFO order and bounded storage")
    func longBurst() {
        var p = Pool(base: 1, cap: 1, stallThreshold: 1000, prompt: false)
        let first = p.enqueue([-1])
        #expect(first)
        guard let w = p.plan(now: 0).spawn.first, case .run(-1) = p.next(worker: w, finished: nil, now: 0, cancelled: false) else {
            Issue.record("expected one worker and the first run")
            return
        }
        var next = 0
        var taken: [Int] = []
        var maxStored = 0
        // 2,000 hand-overs of 32 runs; 31 are taken after each, so the queue
        // grows by one per round and is never empty when the next arrives
        for _ in 0..<2_000 {
            let accepted = p.enqueue(Array(next..<(next + 32)), moreDue: true, keepRefilling: true)
            #expect(accepted)
            next += 32
            for _ in 0..<31 {
                guard case .run(let v) = p.next(worker: w, finished: nil, now: 0, cancelled: false) else {
                    Issue.record("expected a run")
                    return
                }
                taken.append(v)
            }
            maxStored = max(maxStored, p.storedCount)
        }
        while case .run(let v) = p.next(worker: w, finished: nil, now: 0, cancelled: false) { taken.append(v) }
        #expect(taken == Array(0..<next))
        // the taken prefix is dropped as it goes: storage stays near what is
        // queued (at most 2,000 here) instead of every run ever handed over (64,000)
        #expect(maxStored <= 2 * 2_000 + 1_024 + 32)
    }

    @Test("base workers start on demand; a stalled body adds a worker after the threshold, up to the cap")
    func elasticRule() {
        var p = Pool(base: 2, cap: 3, stallThreshold: 1000, prompt: false)
        let accepted = p.enqueue([1, 2, 3])
        #expect(accepted)
        var plan = p.plan(now: 0)
        #expect(plan.spawn.count == 2 && plan.wake.isEmpty)
        #expect(plan.recheck == 1000)
        let (w0, w1) = (plan.spawn[0], plan.spawn[1])
        #expect(isRun(p.next(worker: w0, finished: nil, now: 0, cancelled: false), 1))
        #expect(isRun(p.next(worker: w1, finished: nil, now: 0, cancelled: false), 2))
        // both bodies still fresh: nobody is added yet
        plan = p.plan(now: 500)
        #expect(plan.spawn.isEmpty && plan.recheck == 1000)
        // both stalled: one more worker for the waiting run; at the cap no recheck
        plan = p.plan(now: 1000)
        #expect(plan.spawn.count == 1 && plan.recheck == nil && p.workers == 3)
        #expect(isRun(p.next(worker: plan.spawn[0], finished: nil, now: 1000, cancelled: false), 3))
        // the slow bodies end: the base stays (parked), the surplus worker exits
        let done = RunCompletion(runSlot: 0, runSerial: 1, attempt: 1, outcome: .success, lateness: 0, end: 2000)
        guard case .park = p.next(worker: plan.spawn[0], finished: done, now: 2000, cancelled: false) else { Issue.record("w2 should park"); return }
        guard case .park = p.next(worker: w0, finished: done, now: 2000, cancelled: false) else { Issue.record("w0 should park"); return }
        guard case .exit = p.next(worker: w1, finished: done, now: 2000, cancelled: false) else { Issue.record("w1 is surplus"); return }
        #expect(p.workers == 2 && p.completions.count == 3)
    }

    @Test("a cancelled worker takes no further run; zero threshold gives every waiting run a worker")
    func cancelledWorkerAndZeroThreshold() {
        var p = Pool(base: 2, cap: 64, stallThreshold: 0, prompt: true)
        let accepted = p.enqueue([1, 2, 3, 4])
        #expect(accepted)
        let plan = p.plan(now: 0)
        #expect(plan.spawn.count == 4 && plan.recheck == nil)
        #expect(isRun(p.next(worker: plan.spawn[0], finished: nil, now: 0, cancelled: false), 1))
        #expect(isRun(p.next(worker: plan.spawn[1], finished: nil, now: 0, cancelled: false), 2))
        guard case .exit = p.next(worker: plan.spawn[2], finished: nil, now: 0, cancelled: true) else { Issue.record("cancelled worker must exit"); return }
        #expect(p.queued == 2 && p.workers == 3)
        let closed = p.close()
        let late = p.enqueue([5])
        #expect(closed.abandoned == [3, 4] && !late)
        guard case .exit = p.next(worker: plan.spawn[3], finished: nil, now: 0, cancelled: false) else { Issue.record("closed pool: exit"); return }
    }
}
