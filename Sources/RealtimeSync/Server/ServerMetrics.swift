import Prometheus

/// The server's Prometheus metrics. Gauges are set from `statistics` at each scrape;
/// counters count as things happen.
struct ServerMetrics: Sendable {
    let registry: PrometheusCollectorRegistry
    let sessions: Gauge
    let subscriptions: Gauge
    let queuedBytes: Gauge
    let queuedMessages: Gauge
    let draining: Gauge
    let deliveredMessages: Counter
    let changesProcessed: Counter
    let connections: Gauge
    let connectionsRefused: Counter

    init(registry: PrometheusCollectorRegistry) {
        self.registry = registry
        sessions = registry.makeGauge(descriptor: .init(namespace: "realtime", metricName: "sessions", unitName: "",
                                                        helpText: "Open WebSocket sessions"))
        subscriptions = registry.makeGauge(descriptor: .init(namespace: "realtime", metricName: "subscriptions", unitName: "",
                                                             helpText: "Open subscriptions in the fan-out hub"))
        queuedBytes = registry.makeGauge(descriptor: .init(namespace: "realtime", metricName: "queued", unitName: "bytes",
                                                           helpText: "Bytes waiting in the sockets' send queues"))
        queuedMessages = registry.makeGauge(descriptor: .init(namespace: "realtime", metricName: "queued", unitName: "messages",
                                                              helpText: "Messages waiting in the sockets' send queues"))
        draining = registry.makeGauge(descriptor: .init(namespace: "realtime", metricName: "draining", unitName: "",
                                                        helpText: "1 while the server shuts down"))
        deliveredMessages = registry.makeCounter(descriptor: .init(namespace: "realtime", metricName: "delivered_messages", unitName: "total",
                                                                   helpText: "Messages written to WebSocket clients"))
        changesProcessed = registry.makeCounter(descriptor: .init(namespace: "realtime", metricName: "changes", unitName: "total",
                                                                  helpText: "Changes read by the fan-out"))
        connections = registry.makeGauge(descriptor: .init(namespace: "realtime", metricName: "connections", unitName: "",
                                                           helpText: "Open client connections (HTTP and WebSocket)"))
        connectionsRefused = registry.makeCounter(descriptor: .init(namespace: "realtime", metricName: "connections_refused", unitName: "total",
                                                                    helpText: "Connections refused with 503 at maxConnections"))
    }

    /// Counts a socket that ended with `code` (1006: without a close handshake).
    func recordClose(code: UInt16) {
        registry.makeCounter(descriptor: .init(namespace: "realtime", metricName: "socket_closes", unitName: "total",
                                               helpText: "WebSocket connections ended, by close code"),
                             labels: [("code", String(code))]).increment()
    }

    /// The Prometheus text exposition, gauges refreshed from `statistics`.
    func exposition(_ statistics: RealtimeServerStatistics) -> [UInt8] {
        sessions.set(Int64(statistics.sessions))
        subscriptions.set(Int64(statistics.subscriptions))
        queuedBytes.set(Int64(statistics.queuedBytes))
        queuedMessages.set(Int64(statistics.queuedMessages))
        draining.set(Int64(statistics.isDraining ? 1 : 0))
        connections.set(Int64(statistics.connections))
        var buffer: [UInt8] = []
        registry.emit(into: &buffer)
        return buffer
    }
}
