//! A Wukong-style fan-in: N tasks finish in any order; each bumps a counter in the
//! pool with fetch-and-add, and the one that sees N-1 knows it arrived last and runs
//! the next step.
//!
//! `cargo run --example fan_in_counter`

use farpool::{EmbeddedConfig, EmbeddedPool};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let pool = EmbeddedPool::start(EmbeddedConfig::default())?;
    let driver = pool.client()?;
    let _job = driver.lease("/fanin")?;
    let ctl = driver.task("/fanin/ctl")?;
    ctl.alloc(8)?;
    let n = 8u64;
    let mut handles = Vec::new();
    for i in 0..n {
        let client = pool.client()?;
        handles.push(std::thread::spawn(
            move || -> Result<bool, farpool::ClientError> {
                let counter = client.open_blocks("/fanin/ctl", true)?.remove(0);
                let before = counter.faa(0, 1)?;
                let last = before == n - 1;
                if last {
                    println!("task {i} arrived last and runs the child");
                }
                Ok(last)
            },
        ));
    }
    let mut lasts = 0;
    for h in handles {
        if h.join().map_err(|_| "task panicked")?? {
            lasts += 1;
        }
    }
    assert_eq!(lasts, 1, "exactly one task runs the child");
    ctl.close()?;
    Ok(())
}
