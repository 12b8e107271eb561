import CoreMetrics
import Foundation
import Prometheus

/// The process's one Prometheus registry, installed as the swift-metrics backend the first time
/// a monitor starts (swift-metrics allows one bootstrap per process). FerryNBD records through
/// swift-metrics; the sampler sets its gauges on the registry directly, with help texts.
enum MetricsBackend {
    /// Latency buckets: NBD requests take tens of µs to seconds; acks and heartbeats ms to s.
    static let requestBuckets: [Duration] = [
        .microseconds(50), .microseconds(100), .microseconds(250), .microseconds(500),
        .milliseconds(1), .microseconds(2500), .milliseconds(5), .milliseconds(10), .milliseconds(25),
        .milliseconds(50), .milliseconds(100), .milliseconds(250), .milliseconds(500),
        .seconds(1), .milliseconds(2500), .seconds(5),
    ]

    private static let installed: PrometheusCollectorRegistry = {
        var factory = PrometheusMetricsFactory()
        factory.defaultDurationHistogramBuckets = requestBuckets
        MetricsSystem.bootstrap(factory)
        return factory.registry
    }()

    /// The registry, bootstrapping swift-metrics on first use.
    static var registry: PrometheusCollectorRegistry { installed }
}
