import Foundation
import NIOCore

/// realtime-bench's command line (plain parsing, like the other benchmarks: no extra dependency).
struct Options {
    var url = "ws://127.0.0.1:8080/ws"
    var databaseURL: String?
    var sockets = 100
    var subscriptions = 1
    var uniqueIDs = false
    var table = "public.bench_rows"
    var filter: String?
    var rate = 1000.0
    var duration = 10.0
    var batch: Int?
    var token: String?
    var tokenInQuery = false
    var serverPID: Int32?
    var threads = System.coreCount
    var connectConcurrency = 256
    var idle = 2.0
    var drain = 10.0
    var label = "run"

    static let usage = """
        usage: realtime-bench --url ws://HOST:PORT/ws --database-url URL [options]
          --sockets N              WebSocket clients (100)
          --subscriptions K        subscriptions per socket, all to --table with --filter (1)
          --unique-ids             each socket's subscription ids are its own (s1-<socket>), as with one id per user
          --table T                table to subscribe to and insert into (public.bench_rows:
                                   id int8 primary key, client_ts int8 (µs since the epoch), payload text)
          --filter F               subscription filter; loss counting assumes it matches every row
          --rate R                 rows inserted per second (1000); 0 only connects, subscribes, measures RSS
          --duration S             seconds of inserts (10)
          --batch B                most rows per INSERT transaction (default max(1, rate/1000))
          --token T                JWT sent as Authorization: Bearer (with --token-in-query: ?access_token=)
          --server-pid PID         read the server's VmRSS before connecting and once all sockets are subscribed
          --threads N              event-loop threads (cores: \(System.coreCount))
          --connect-concurrency N  connections opened at once (256)
          --idle S                 seconds to wait, subscribed and idle, before reading RSS (2)
          --drain S                seconds to wait after the last insert for stragglers (10)
          --label NAME             name on the RESULT line (run)
        """

    static func parse(_ arguments: [String]) throws -> Options {
        var options = Options()
        var index = 0
        func value(_ name: String) throws -> String {
            index += 1
            guard index < arguments.count else { throw UsageError("\(name) needs a value") }
            return arguments[index]
        }
        func number<T: LosslessStringConvertible>(_ name: String, _: T.Type) throws -> T {
            let text = try value(name)
            guard let number = T(text) else { throw UsageError("\(name) \(text): not a number") }
            return number
        }
        while index < arguments.count {
            let argument = arguments[index]
            switch argument {
            case "--url": options.url = try value(argument)
            case "--database-url": options.databaseURL = try value(argument)
            case "--sockets": options.sockets = try number(argument, Int.self)
            case "--subscriptions": options.subscriptions = try number(argument, Int.self)
            case "--unique-ids": options.uniqueIDs = true
            case "--table": options.table = try value(argument)
            case "--filter": options.filter = try value(argument)
            case "--rate": options.rate = try number(argument, Double.self)
            case "--duration": options.duration = try number(argument, Double.self)
            case "--batch": options.batch = try number(argument, Int.self)
            case "--token": options.token = try value(argument)
            case "--token-in-query": options.tokenInQuery = true
            case "--server-pid": options.serverPID = try number(argument, Int32.self)
            case "--threads": options.threads = try number(argument, Int.self)
            case "--connect-concurrency": options.connectConcurrency = try number(argument, Int.self)
            case "--idle": options.idle = try number(argument, Double.self)
            case "--drain": options.drain = try number(argument, Double.self)
            case "--label": options.label = try value(argument)
            case "-h", "--help": print(usage); exit(0)
            default: throw UsageError("unknown option \(argument)")
            }
            index += 1
        }
        guard options.sockets > 0, options.subscriptions > 0, options.threads > 0, options.connectConcurrency > 0 else {
            throw UsageError("--sockets, --subscriptions, --threads and --connect-concurrency must be positive")
        }
        if options.rate > 0 && options.databaseURL == nil { throw UsageError("--rate > 0 needs --database-url to insert into") }
        return options
    }

    /// Rows per transaction at most.
    var batchLimit: Int { batch ?? max(1, Int(rate / 1000)) }

    /// host, port and path (with the token as a query parameter when asked) of `url`.
    func endpoint() throws -> (host: String, port: Int, target: String) {
        guard let components = URLComponents(string: url), components.scheme == "ws", let host = components.host else {
            throw UsageError("--url \(url): expected ws://host:port/path")
        }
        var target = components.percentEncodedPath.isEmpty ? "/" : components.percentEncodedPath
        if let query = components.percentEncodedQuery { target += "?" + query }
        if let token, tokenInQuery {
            target += (target.contains("?") ? "&" : "?") + "access_token=" + token
        }
        return (host, components.port ?? 80, target)
    }
}

struct UsageError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}
