import Foundation
import RealtimeSync
import Testing

@Suite("fan-out hub")
struct FanoutHubTests {
    func subscription(_ id: String, _ filter: String = "", events: ChangeOperationSet = .default,
                      table: String = "public.items") throws -> ResolvedSubscription {
        ResolvedSubscription(id: id, table: table, events: events, filter: try itemsFilter(filter))
    }

    func summary(_ deliveries: [FanoutDelivery]) -> [String] {
        deliveries.map { "\($0.client.rawValue):" + $0.subscriptionIDs.joined(separator: ",") }
    }

    @Test("A change reaches each client once, with all its matching ids in subscription order; clients sorted")
    func onePerClient() throws {
        var hub = FanoutHub()
        try hub.subscribe(client: FanoutClientID(2), subscription("z-all"))
        try hub.subscribe(client: FanoutClientID(1), subscription("open", "status=eq.open"))
        try hub.subscribe(client: FanoutClientID(1), subscription("big", "amount=gt.100"))
        try hub.subscribe(client: FanoutClientID(1), subscription("a-paid", "status=eq.paid"))
        try hub.subscribe(client: FanoutClientID(1), subscription("inserts", events: .insert))
        try hub.subscribe(client: FanoutClientID(3), subscription("other-table", table: "public.notes"))
        #expect(hub.subscriptionCount == 6)
        #expect(hub.clientCount == 3)
        #expect(hub.indexedSubscriptionCount == 2)
        #expect(hub.subscriptionCount(table: "public.items") == 5)

        let insert = insertEvent(["id": "1", "status": "open", "amount": "150.00"])
        #expect(summary(hub.match(insert)) == ["1:open,big,inserts", "2:z-all"])
        let update = updateEvent(["id": "1", "status": "paid", "amount": "10"])
        #expect(summary(hub.match(update)) == ["1:a-paid", "2:z-all"])
        #expect(summary(hub.match(deleteEvent(["id": "1"]))) == ["2:z-all"])  // key-only: filters withheld
        #expect(summary(hub.match(truncateEvent())) == [])  // nobody asked for TRUNCATE
        #expect(hub.subscriptionIDs(of: FanoutClientID(1)) == ["open", "big", "a-paid", "inserts"])
    }

    @Test("duplicate_subscription and too_many_subscriptions, per client")
    func limits() throws {
        var hub = FanoutHub(limits: .init(maxSubscriptionsPerClient: 2))
        try hub.subscribe(client: FanoutClientID(1), subscription("a"))
        let duplicate = #expect(throws: ProtocolError.self) { try hub.subscribe(client: FanoutClientID(1), subscription("a", "status=eq.x")) }
        #expect(duplicate?.code == .duplicateSubscription)
        #expect(duplicate?.id == "a")
        #expect(duplicate?.message == "subscription 'a' is already open; unsubscribe it first or choose another id")
        try hub.subscribe(client: FanoutClientID(2), subscription("a"))  // ids are per client
        try hub.subscribe(client: FanoutClientID(1), subscription("b"))
        let tooMany = #expect(throws: ProtocolError.self) { try hub.subscribe(client: FanoutClientID(1), subscription("c")) }
        #expect(tooMany?.code == .tooManySubscriptions)
        #expect(tooMany?.message == "this connection holds 2 subscriptions (maxSubscriptionsPerClient=2); unsubscribe some first")
        let removed = hub.unsubscribe(client: FanoutClientID(1), id: "a")
        let removedAgain = hub.unsubscribe(client: FanoutClientID(1), id: "a")
        #expect(removed)
        #expect(!removedAgain)
        try hub.subscribe(client: FanoutClientID(1), subscription("a"))  // room again, id free again
        #expect(hub.subscriptionCount == 3)
    }

    @Test("Unsubscribing and removing clients return every count to zero")
    func removal() throws {
        var hub = FanoutHub()
        for client in 1...5 {
            try hub.subscribe(client: FanoutClientID(UInt64(client)), subscription("eq", "status=eq.open"))
            try hub.subscribe(client: FanoutClientID(UInt64(client)), subscription("in", "qty=in.(1,2,3)"))
            try hub.subscribe(client: FanoutClientID(UInt64(client)), subscription("scan", "amount=gt.1"))
        }
        #expect(hub.subscriptionCount == 15)
        #expect(hub.indexedSubscriptionCount == 10)
        let removed = hub.unsubscribe(client: FanoutClientID(1), id: "in")
        #expect(removed)
        #expect(summary(hub.match(insertEvent(["status": "open", "qty": "2"]))).first == "1:eq")
        let count = hub.removeClient(FanoutClientID(2))
        let countAgain = hub.removeClient(FanoutClientID(2))
        #expect(count == 3)
        #expect(countAgain == 0)
        #expect(summary(hub.match(insertEvent(["status": "open", "qty": "2"]))) == ["1:eq", "3:eq,in", "4:eq,in", "5:eq,in"])
        for client in 1...5 { hub.removeClient(FanoutClientID(UInt64(client))) }
        #expect(hub.subscriptionCount == 0)
        #expect(hub.indexedSubscriptionCount == 0)
        #expect(hub.clientCount == 0)
        #expect(hub.subscriptionCount(table: "public.items") == 0)
        #expect(hub.match(insertEvent(["status": "open", "qty": "2"])).isEmpty)
    }

    @Test("Index keys follow the column's comparison: 1.50 finds eq.1.5, 007 finds eq.7, uuid case, bool spellings")
    func indexKeys() throws {
        var hub = FanoutHub()
        try hub.subscribe(client: FanoutClientID(1), subscription("amount", "amount=eq.1.5"))
        try hub.subscribe(client: FanoutClientID(1), subscription("amount-int", "amount=eq.2"))
        try hub.subscribe(client: FanoutClientID(1), subscription("qty", "qty=eq.007"))
        try hub.subscribe(client: FanoutClientID(1), subscription("uid", "uid=eq.A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"))
        try hub.subscribe(client: FanoutClientID(1), subscription("paid", "paid=eq.yes"))
        try hub.subscribe(client: FanoutClientID(1), subscription("nan", "price=in.(NaN,1e3)"))
        #expect(hub.indexedSubscriptionCount == 6)
        #expect(summary(hub.match(insertEvent(["amount": "1.50"]))) == ["1:amount"])
        #expect(summary(hub.match(insertEvent(["amount": "2.000"]))) == ["1:amount-int"])
        #expect(summary(hub.match(insertEvent(["qty": "7"]))) == ["1:qty"])
        #expect(summary(hub.match(insertEvent(["uid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]))) == ["1:uid"])
        #expect(summary(hub.match(insertEvent(["paid": "t"]))) == ["1:paid"])
        #expect(summary(hub.match(insertEvent(["price": "NaN"]))) == ["1:nan"])
        #expect(summary(hub.match(insertEvent(["price": "1000"]))) == ["1:nan"])
        #expect(hub.match(insertEvent(["price": "1001"])).isEmpty)
    }

    @Test("The index agrees with a brute-force scan on random subscriptions and changes")
    func indexMatchesBruteForce() async throws {
        var rng = SplitMix64(seed: 20_260_601)
        let statuses = ["open", "paid", "void", "a,b"]
        func randomCondition() -> String {
            switch Int.random(in: 0...9, using: &rng) {
            case 0: return "status=eq.\(statuses.randomElement(using: &rng)!.replacingOccurrences(of: ",", with: ""))"
            case 1: return "status=in.(\"a,b\",\(statuses.randomElement(using: &rng)!.replacingOccurrences(of: ",", with: "")))"
            case 2: return "tenant_id=eq.\(Int.random(in: 1...5, using: &rng))"
            case 3: return "tenant_id=in.(\(Int.random(in: 1...5, using: &rng)),\(Int.random(in: 1...5, using: &rng)))"
            case 4: return "amount=\(["lt", "gt", "eq", "neq"].randomElement(using: &rng)!).\(Int.random(in: 0...4, using: &rng)).5"
            case 5: return "amount=eq.\(Int.random(in: 0...4, using: &rng))"
            case 6: return "paid=eq.\(Bool.random(using: &rng))"
            case 7: return "status=is.\(Bool.random(using: &rng) ? "null" : "notnull")"
            case 8: return "id=\(["eq", "gte"].randomElement(using: &rng)!).\(Int.random(in: 1...6, using: &rng))"
            default: return "qty=neq.\(Int.random(in: 0...3, using: &rng))"
            }
        }
        var hub = FanoutHub(limits: .init(maxSubscriptionsPerClient: 1_000))
        var all: [(client: FanoutClientID, subscription: ResolvedSubscription, order: Int)] = []
        var order = 0
        for client in 1...40 {
            for number in 0..<Int.random(in: 0...12, using: &rng) {
                let filter = (0..<Int.random(in: 0...3, using: &rng)).map { _ in randomCondition() }.joined(separator: "&")
                var events: ChangeOperationSet = []
                for operation in [ChangeOperationSet.insert, .update, .delete, .truncate] where Int.random(in: 0...3, using: &rng) > 0 {
                    events.insert(operation)
                }
                if events.isEmpty { events = .default }
                let table = Int.random(in: 0...9, using: &rng) == 0 ? "public.notes" : "public.items"
                let subscription = ResolvedSubscription(id: "c\(client)-s\(number)", table: table, events: events, filter: try itemsFilter(filter))
                try hub.subscribe(client: FanoutClientID(UInt64(client)), subscription)
                all.append((FanoutClientID(UInt64(client)), subscription, order))
                order += 1
            }
        }
        // Drop some, to exercise removal from the indexes.
        for _ in 0..<30 {
            guard let victim = all.randomElement(using: &rng) else { break }
            let removed = hub.unsubscribe(client: victim.client, id: victim.subscription.id)
            #expect(removed)
            all.removeAll { $0.client == victim.client && $0.subscription.id == victim.subscription.id }
        }
        hub.removeClient(FanoutClientID(7))
        all.removeAll { $0.client == FanoutClientID(7) }
        #expect(hub.subscriptionCount == all.count)
        #expect(hub.indexedSubscriptionCount > 0 && hub.indexedSubscriptionCount < all.count)

        func randomValues() -> [String: String?] {
            var values: [String: String?] = ["id": String(Int.random(in: 1...6, using: &rng))]
            if Bool.random(using: &rng) { values["status"] = statuses.randomElement(using: &rng)! }
            if Int.random(in: 0...4, using: &rng) > 0 { values["tenant_id"] = String(Int.random(in: 1...5, using: &rng)) }
            if Bool.random(using: &rng) { values["amount"] = ["0", "1.5", "2.50", "3", "4.0", "4.5", "NaN"].randomElement(using: &rng)! }
            if Bool.random(using: &rng) { values["paid"] = Bool.random(using: &rng) ? "t" : "f" }
            if Bool.random(using: &rng) { values["qty"] = String(Int.random(in: 0...3, using: &rng)) }
            return values
        }
        var delivered = 0
        for iteration in 0..<3_000 {
            // Long CPU-bound loops give the cooperative pool back now and then: timing tests share it.
            if iteration % 256 == 255 { await Task.yield() }
            let event: ChangeEvent
            switch Int.random(in: 0...4, using: &rng) {
            case 0, 1: event = insertEvent(randomValues())
            case 2: event = updateEvent(randomValues(), unchanged: Bool.random(using: &rng) ? ["status"] : [])
            case 3: event = deleteEvent(randomValues(), oldKind: Bool.random(using: &rng) ? .key : .full)
            default: event = truncateEvent()
            }
            // Brute force: every subscription, in client then subscription order.
            var expected: [String] = []
            let matching = all.filter { entry in
                entry.subscription.table == event.table && entry.subscription.events.contains(event.operation)
                    && entry.subscription.filter.matches(event)
            }.sorted { ($0.client, $0.order) < ($1.client, $1.order) }
            var position = 0
            while position < matching.count {
                let client = matching[position].client
                var ids: [String] = []
                while position < matching.count, matching[position].client == client {
                    ids.append(matching[position].subscription.id)
                    position += 1
                }
                expected.append("\(client.rawValue):" + ids.joined(separator: ","))
            }
            let actual = summary(hub.match(event))
            #expect(actual == expected)
            delivered += actual.count
        }
        #expect(delivered > 1_000)  // the test exercises real matches
    }

    // MARK: encoding

    @Test("A change is encoded once; each client's frame is its ids plus the shared members")
    func frames() throws {
        var hub = FanoutHub()
        try hub.subscribe(client: FanoutClientID(1), subscription("s1", "status=eq.open"))
        try hub.subscribe(client: FanoutClientID(1), subscription("quo\"te\n", "id=eq.1"))
        try hub.subscribe(client: FanoutClientID(2), subscription("s1"))
        let event = insertEvent(["id": "1", "status": "open", "amount": "1.50", "paid": "t"])
        let deliveries = hub.match(event)
        let change = EncodedChange(event)
        var members: [UInt8] = []
        event.writeJSONMembers(into: &members)
        #expect(change.members == members)
        let first = change.frame(for: deliveries[0])
        #expect(text(first) == #"{"type":"change","ids":["s1","quo\"te\n"],"# + text(members) + "}")
        #expect(first == change.frame(ids: ["s1", "quo\"te\n"]))
        let object = try #require(try JSONSerialization.jsonObject(with: Data(first)) as? [String: Any])
        #expect(object["type"] as? String == "change")
        #expect(object["ids"] as? [String] == ["s1", "quo\"te\n"])
        #expect(object["op"] as? String == "INSERT")
        #expect(object["table"] as? String == "public.items")
        #expect(object["cursor"] as? String == "0000000000001000.00000000")
        let frames = hub.frames(for: event)
        #expect(frames.map(\.client) == [FanoutClientID(1), FanoutClientID(2)])
        #expect(frames[0].frame == first)
        #expect(text(frames[1].frame) == #"{"type":"change","ids":["s1"],"# + text(members) + "}")
        #expect(hub.frames(for: insertEvent(["id": "2"], relation: ordersRelation)).isEmpty)
    }

    @Test("Matching and encoding for many clients (benchmark-shaped, no timing asserted)")
    func manyClients() throws {
        var hub = FanoutHub()
        for client in 0..<1_000 {
            try hub.subscribe(client: FanoutClientID(UInt64(client)), subscription("all"))
            try hub.subscribe(client: FanoutClientID(UInt64(client)), subscription("tenant", "tenant_id=eq.\(client % 100)"))
        }
        let frames = hub.frames(for: insertEvent(["id": "1", "tenant_id": "42"]))
        #expect(frames.count == 1_000)
        #expect(frames.filter { text($0.frame).hasPrefix(#"{"type":"change","ids":["all","tenant"],"#) }.count == 10)
    }
}
