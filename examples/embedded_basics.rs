//! Embedding farpool: start an in-process pool, open a task, allocate blocks, use
//! one-sided operations, batch them, and free everything.
//!
//! `cargo run --example embedded_basics`

use farpool::{EmbeddedConfig, EmbeddedPool};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let pool = EmbeddedPool::start(EmbeddedConfig::default())?;
    let client = pool.client()?;
    let task = client.task("/example/stage0/task0")?;

    let blocks = task.alloc(3 << 20)?;
    println!("allocated {} blocks: {:?}", blocks.len(), blocks);

    let b = &blocks[0];
    b.write(0, b"hello, far memory")?;
    let mut buf = [0u8; 17];
    b.read(0, &mut buf)?;
    println!("read back: {}", String::from_utf8_lossy(&buf));

    // Atomics on 8-byte aligned words.
    b.faa(4096, 5)?;
    let seen = b.cas(4096, 5, 100)?;
    println!("cas saw {seen}; word is now 100");

    // A batch: 16 writes outstanding together, one round trip.
    let payload = vec![7u8; 4096];
    let mut ops = (0..16u64)
        .map(|i| b.write_op(8192 + i * 4096, &payload))
        .collect::<Result<Vec<_>, _>>()?;
    b.execute(&mut ops)?;
    println!("batch of {} writes done", ops.len());

    println!("{}", farpool::cli::render_status(&client.status()?));
    task.close()?;
    println!("after close: {} bytes in use", client.status()?.used_bytes);
    Ok(())
}
