//! `secumon-agent`: the native host agent. Collection and the OTLP exporter come in their own
//! issue; for now the binary only states what it is.

fn main() {
    eprintln!(
        "secumon-agent {}: host collection is not implemented yet",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(2);
}
