import Testing

@testable import Scheduler

@Suite("WorkerPool")
struct WorkerPoolTests {
    typealias Pool = WorkerPool<Int>

    func isRun(_ n: Pool.Next, _ v: Int) -> Bool {
        if case .run(let x) = n { return x == v }
        return false
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
