//! The README's main command: the demo runs, frames flow through every port, and it stops
//! cleanly at the end of its duration.

use vswitch_bench::demo::{run, DemoConfig};

#[test]
fn test_demo_moves_traffic_through_every_port_and_cleans_up() {
    let dir = std::env::temp_dir().join(format!("vswitch-demo-test-{}", std::process::id()));
    let total = run(DemoConfig {
        ports: 3,
        size: 64,
        duration: 2,
        busy_poll: false,
        pmd_cores: vec![],
        dir: dir.clone(),
    })
    .expect("demo runs");
    assert!(total > 10_000, "only {total} frames delivered");
    assert!(!dir.exists(), "sockets removed");
}
