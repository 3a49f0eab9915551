import Foundation
import RealtimeSync
import Testing

@Suite("auth: mandatory filter in the fan-out hub")
struct AuthFanoutTests {
    let catalog = TableCatalog(["public.items": itemsColumns])

    func resolve(_ id: String, grant: String, filter: String = "") throws -> ResolvedSubscription {
        try catalog.resolve(SubscribeRequest(id: id, table: TableName(schema: "public", name: "items"), filter: filter),
                            access: .restricted(["public.items": grant]))
    }

    func ids(_ hub: FanoutHub, _ event: ChangeEvent) -> [String] {
        hub.match(event).flatMap(\.subscriptionIDs)
    }

    @Test("The token's tenant_id=eq.N is the index key; other tenants' rows never match, the client's filter still applies")
    func indexedByMandatoryEquality() throws {
        var hub = FanoutHub()
        try hub.subscribe(client: FanoutClientID(1), resolve("t42-open", grant: "tenant_id=eq.42", filter: "status=eq.open"))
        try hub.subscribe(client: FanoutClientID(2), resolve("t43-all", grant: "tenant_id=eq.43"))
        try hub.subscribe(client: FanoutClientID(3), resolve("t42-in", grant: "tenant_id=in.(42,44)", filter: "qty=gt.1"))
        #expect(hub.indexedSubscriptionCount == 3)  // all three under tenant_id, none in the scan list
        #expect(ids(hub, insertEvent(["id": "1", "tenant_id": "42", "status": "open", "qty": "5"])) == ["t42-open", "t42-in"])
        #expect(ids(hub, insertEvent(["id": "2", "tenant_id": "42", "status": "closed", "qty": "5"])) == ["t42-in"])
        #expect(ids(hub, insertEvent(["id": "3", "tenant_id": "43", "status": "open", "qty": "5"])) == ["t43-all"])
        #expect(ids(hub, insertEvent(["id": "4", "tenant_id": "7", "status": "open", "qty": "5"])) == [])
        #expect(ids(hub, insertEvent(["id": "5", "tenant_id": nil, "status": "open", "qty": "5"])) == [])
    }

    @Test("A mandatory filter without equality: indexed on the client's equality, the mandatory condition still checked")
    func indexedByClientEquality() throws {
        var hub = FanoutHub()
        try hub.subscribe(client: FanoutClientID(1), resolve("s", grant: "tenant_id=gte.40&tenant_id=lt.50", filter: "status=eq.open"))
        #expect(hub.indexedSubscriptionCount == 1)
        #expect(ids(hub, insertEvent(["id": "1", "tenant_id": "42", "status": "open"])) == ["s"])
        #expect(ids(hub, insertEvent(["id": "2", "tenant_id": "52", "status": "open"])) == [])
        #expect(ids(hub, insertEvent(["id": "3", "tenant_id": "42", "status": "paid"])) == [])
    }

    @Test("DELETE fails closed: withheld when the old row lacks the mandatory column (key-only identity), delivered when it has it")
    func deleteFailsClosed() throws {
        var hub = FanoutHub()
        try hub.subscribe(client: FanoutClientID(1), resolve("t42", grant: "tenant_id=eq.42"))
        try hub.subscribe(client: FanoutClientID(2), resolve("every-row", grant: ""))
        let keyOnly = deleteEvent(["id": "1", "tenant_id": "42"], oldKind: .key)
        #expect(ids(hub, keyOnly) == ["every-row"])
        #expect(ids(hub, deleteEvent(["id": "1", "tenant_id": "42"], oldKind: .full)) == ["t42", "every-row"])
        #expect(ids(hub, deleteEvent(["id": "1", "tenant_id": "43"], oldKind: .full)) == ["every-row"])
    }

    @Test("UPDATE is judged by the new row: moving a row out of the tenant is not sent to it, moving one in is")
    func updateMovesTenant() throws {
        var hub = FanoutHub()
        try hub.subscribe(client: FanoutClientID(1), resolve("t42", grant: "tenant_id=eq.42"))
        let out = updateEvent(["id": "1", "tenant_id": "43"], old: ["id": "1", "tenant_id": "42"], oldKind: .full)
        #expect(ids(hub, out) == [])
        let into = updateEvent(["id": "1", "tenant_id": "42"], old: ["id": "1", "tenant_id": "43"], oldKind: .full)
        #expect(ids(hub, into) == ["t42"])
    }

    @Test("A row moved into the tenant: its old row (the other tenant's values) is withheld from the tenant (old: null); an unrestricted client, and a row moving within the tenant, keep the whole old row")
    func movedInRowHidesOldValues() throws {
        var hub = FanoutHub()
        try hub.subscribe(client: FanoutClientID(1), resolve("t42", grant: "tenant_id=eq.42"))
        try hub.subscribe(client: FanoutClientID(2), try catalog.resolve(SubscribeRequest(id: "all", table: TableName(schema: "public", name: "items"))))
        func olds(_ event: ChangeEvent) throws -> [UInt64: [String: Any]] {
            var result: [UInt64: [String: Any]] = [:]
            for (client, frame) in hub.frames(for: event) {
                let message = try #require(try JSONSerialization.jsonObject(with: Data(frame)) as? [String: Any])
                result[client.rawValue] = message["old"] as? [String: Any] ?? ["null": message["old"] is NSNull]
            }
            return result
        }
        let into = try olds(updateEvent(["id": "1", "tenant_id": "42", "status": "open"], old: ["id": "1", "tenant_id": "43", "status": "secret"], oldKind: .full))
        #expect(into[1]?["null"] as? Bool == true, "\(into)")
        #expect(into[2]?["status"] as? String == "secret", "\(into)")
        let within = try olds(updateEvent(["id": "1", "tenant_id": "42", "status": "paid"], old: ["id": "1", "tenant_id": "42", "status": "open"], oldKind: .full))
        #expect(within[1]?["status"] as? String == "open" && within[1]?["tenant_id"] as? Int == 42, "\(within)")
        // A key that holds the tenant column ((tenant_id, id)): the old key of a row moved in
        // shows the other tenant; one of a row that stayed is kept.
        let keyed = itemsColumns.map { RelationColumn(name: $0.name, typeOID: $0.typeOID, isKey: $0.name == "id" || $0.name == "tenant_id") }
        let keyedRelation = Relation(oid: itemsRelation.oid, namespace: "public", name: "items", replicaIdentity: .default, columns: keyed)
        let movedKey = try olds(updateEvent(["id": "1", "tenant_id": "42"], old: ["id": "1", "tenant_id": "43"], oldKind: .key, relation: keyedRelation))
        #expect(movedKey[1]?["null"] as? Bool == true, "\(movedKey)")
        #expect(movedKey[2]?["tenant_id"] as? Int == 43, "\(movedKey)")
        let keptKey = try olds(updateEvent(["id": "2", "tenant_id": "42"], old: ["id": "1", "tenant_id": "42"], oldKind: .key, relation: keyedRelation))
        #expect(keptKey[1]?["id"] as? Int == 1, "\(keptKey)")
        // A key without the tenant column shows nothing of the other tenant: kept.
        let idOnly = try olds(updateEvent(["id": "2", "tenant_id": "42"], old: ["id": "1"], oldKind: .key))
        #expect(idOnly[1]?["id"] as? Int == 1, "\(idOnly)")
    }
}
