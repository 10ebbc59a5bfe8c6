//! `farpool demo`: a word-count job on an embedded pool.
//!
//! Map tasks count words in their slice of the input and write one partition per
//! reducer into blocks they allocate at `/wordcount/map/m<i>/p<j>`; reduce tasks open
//! those blocks read-only, merge them, write their result, and bump a shared
//! completion counter with fetch-and-add. The driver holds the job's lease, shows
//! per-task allocation after each stage, reclaims the intermediate data, checks the
//! result against a local count, and shows that every block came back.

use crate::client::{BlockHandle, Client, ClientError};
use crate::embedded::{EmbeddedConfig, EmbeddedError, EmbeddedPool};
use crate::size::format_size;
use farpool_rdma::TransportKind;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

/// Options of `farpool demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Map tasks.
    #[arg(long, default_value_t = 4)]
    pub mappers: usize,
    /// Reduce tasks.
    #[arg(long, default_value_t = 3)]
    pub reducers: usize,
    /// Memory nodes in the embedded pool.
    #[arg(long, default_value_t = 2)]
    pub nodes: usize,
    /// Data-plane transport of the embedded nodes.
    #[arg(long, default_value = "soft")]
    pub transport: TransportKind,
    /// Input text file (default: a generated corpus of about 2 MiB).
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Words in the generated corpus.
    #[arg(long, default_value_t = 300_000)]
    pub words: usize,
}

/// Why the demo failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The pool did not start.
    #[error(transparent)]
    Pool(#[from] EmbeddedError),
    /// A pool operation failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The input could not be read.
    #[error("cannot read input {path}: {source}")]
    Input {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A stored partition is malformed.
    #[error("corrupt partition at {0}")]
    Corrupt(String),
    /// A task thread panicked.
    #[error("a task thread panicked")]
    Panicked,
    /// The pool's answer differs from the local count.
    #[error("verification failed: {0}")]
    Mismatch(String),
    /// Blocks were still allocated after the job was removed.
    #[error("{0} bytes still allocated after the job was removed")]
    Leak(u64),
    /// Bad arguments.
    #[error("{0}")]
    Args(String),
}

const JOB: &str = "/wordcount";

/// Generates a deterministic corpus over a vocabulary of about 20,000 made-up words
/// with a skewed (Zipf-like) distribution, so a few words are very common and most are
/// rare, as in natural text; the shuffle then carries a realistic amount of data.
pub fn generate_corpus(words: usize) -> String {
    const SYLLABLES: &[&str] = &[
        "ka", "lo", "mi", "ren", "tu", "sha", "vo", "dri", "pe", "lun", "ax", "zo", "fi", "gar",
        "ne", "bo", "qui", "sa", "tor", "el",
    ];
    const VOCAB: u64 = 20_000;
    let word = |mut i: u64, out: &mut String| {
        // Base-20 digits of the word index pick its syllables: 1 to 4 of them.
        loop {
            out.push_str(SYLLABLES[(i % 20) as usize]);
            i /= 20;
            if i == 0 {
                break;
            }
        }
    };
    let mut out = String::with_capacity(words * 8);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..words {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Cube a uniform draw to skew towards the front of the vocabulary.
        let u = (x % 1_000_000) as f64 / 1_000_000.0;
        let idx = ((u * u * u) * VOCAB as f64) as u64;
        word(idx.min(VOCAB - 1), &mut out);
        out.push(if i % 16 == 15 { '\n' } else { ' ' });
    }
    out
}

fn count_words(text: &str) -> HashMap<String, u64> {
    let mut m = HashMap::new();
    for w in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        *m.entry(w.to_lowercase()).or_insert(0) += 1;
    }
    m
}

fn partition_of(word: &str, reducers: usize) -> usize {
    // FNV-1a: stable across processes and runs.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in word.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    (h % reducers as u64) as usize
}

fn encode_counts(m: &HashMap<String, u64>) -> Vec<u8> {
    let mut out = Vec::new();
    for (w, c) in m {
        out.extend_from_slice(w.as_bytes());
        out.push(b'\t');
        out.extend_from_slice(c.to_string().as_bytes());
        out.push(b'\n');
    }
    out
}

fn decode_counts(
    data: &[u8],
    into: &mut HashMap<String, u64>,
    what: &str,
) -> Result<(), DemoError> {
    let text = std::str::from_utf8(data).map_err(|_| DemoError::Corrupt(what.into()))?;
    for line in text.lines() {
        let (w, c) = line
            .split_once('\t')
            .ok_or_else(|| DemoError::Corrupt(what.into()))?;
        let c: u64 = c.parse().map_err(|_| DemoError::Corrupt(what.into()))?;
        *into.entry(w.to_string()).or_insert(0) += c;
    }
    Ok(())
}

/// Writes `data` with an 8-byte length prefix across `blocks`, in order.
pub fn write_stream(blocks: &[BlockHandle], data: &[u8]) -> Result<(), ClientError> {
    let mut framed = Vec::with_capacity(8 + data.len());
    framed.extend_from_slice(&(data.len() as u64).to_le_bytes());
    framed.extend_from_slice(data);
    let mut rest = &framed[..];
    for b in blocks {
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(b.len() as usize);
        b.write(0, &rest[..n])?;
        rest = &rest[n..];
    }
    Ok(())
}

/// Reads a stream written by [`write_stream`].
pub fn read_stream(blocks: &[BlockHandle]) -> Result<Vec<u8>, DemoError> {
    let first = blocks
        .first()
        .ok_or_else(|| DemoError::Corrupt("stream without blocks".into()))?;
    let mut len = [0u8; 8];
    first.read(0, &mut len)?;
    let len = u64::from_le_bytes(len) as usize;
    let capacity: u64 = blocks.iter().map(|b| b.len()).sum();
    if len as u64 + 8 > capacity {
        return Err(DemoError::Corrupt(format!(
            "length {len} exceeds the stream's {capacity} bytes"
        )));
    }
    let mut framed = vec![0u8; len + 8];
    let mut off = 0usize;
    for b in blocks {
        if off >= framed.len() {
            break;
        }
        let n = (framed.len() - off).min(b.len() as usize);
        b.read(0, &mut framed[off..off + n])?;
        off += n;
    }
    Ok(framed.split_off(8))
}

fn show_usage(client: &Client, title: &str) -> Result<u64, ClientError> {
    let st = client.status()?;
    println!(
        "\n== {title}: {} of {} in use",
        format_size(st.used_bytes),
        format_size(st.capacity_bytes)
    );
    for p in st.paths.iter().filter(|p| p.path.as_str().starts_with(JOB)) {
        if p.blocks > 0 || p.path.components().count() <= 2 {
            println!(
                "   {:<34} {:>3} blocks  {:>10} in subtree",
                p.path.as_str(),
                p.blocks,
                format_size(p.subtree_bytes)
            );
        }
    }
    Ok(st.used_bytes)
}

fn join_all<T>(
    handles: Vec<std::thread::JoinHandle<Result<T, DemoError>>>,
) -> Result<Vec<T>, DemoError> {
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.join().map_err(|_| DemoError::Panicked)??);
    }
    Ok(out)
}

/// Runs the demo; prints progress and a summary.
pub fn run(args: DemoArgs) -> Result<(), DemoError> {
    if args.mappers == 0 || args.reducers == 0 || args.nodes == 0 {
        return Err(DemoError::Args(
            "--mappers, --reducers and --nodes must be at least 1".into(),
        ));
    }
    let text = match &args.input {
        Some(p) => std::fs::read_to_string(p).map_err(|source| DemoError::Input {
            path: p.clone(),
            source,
        })?,
        None => generate_corpus(args.words),
    };
    let started = Instant::now();
    let pool = EmbeddedPool::start(EmbeddedConfig {
        nodes: args.nodes,
        capacity: 64 << 20,
        block_size: 64 << 10,
        transport: args.transport,
        ..EmbeddedConfig::default()
    })?;
    println!(
        "farpool demo: word count over an embedded pool ({} memory nodes, {} transport, controller {})",
        args.nodes,
        args.transport,
        pool.addr()
    );
    println!(
        "input: {} in {} lines; {} map tasks, {} reduce tasks",
        format_size(text.len() as u64),
        text.lines().count(),
        args.mappers,
        args.reducers
    );
    let driver = pool.client()?;
    let _job_lease = driver.lease(JOB)?;
    let baseline = driver.status()?.used_bytes;

    // Control block: a fan-in counter the reducers bump with fetch-and-add.
    let ctl = driver.task(&format!("{JOB}/ctl"))?;
    let counter = ctl.alloc(8)?;

    // Map stage: split the input on line boundaries.
    let lines: Vec<&str> = text.lines().collect();
    let per = lines.len().div_ceil(args.mappers).max(1);
    let t_map = Instant::now();
    let mut maps = Vec::new();
    for i in 0..args.mappers {
        let slice = lines
            .get(i * per..((i + 1) * per).min(lines.len()))
            .unwrap_or(&[])
            .join("\n");
        let client = pool.client()?;
        let reducers = args.reducers;
        maps.push(std::thread::spawn(move || -> Result<u64, DemoError> {
            let task = client.task(&format!("{JOB}/map/m{i}"))?;
            let mut parts: Vec<HashMap<String, u64>> = vec![HashMap::new(); reducers];
            for (w, c) in count_words(&slice) {
                let p = partition_of(&w, reducers);
                parts[p].insert(w, c);
            }
            let mut bytes = 0;
            for (j, part) in parts.iter().enumerate() {
                let data = encode_counts(part);
                let blocks = task.alloc_at(&format!("p{j}"), data.len() as u64 + 8)?;
                write_stream(&blocks, &data)?;
                bytes += data.len() as u64;
            }
            // Keep the partitions for the reducers: they live under the job's lease.
            task.finish()?;
            Ok(bytes)
        }));
    }
    let shuffled: u64 = join_all(maps)?.iter().sum();
    println!(
        "\nmap stage: {} of partitions written in {:.1} ms",
        format_size(shuffled),
        t_map.elapsed().as_secs_f64() * 1e3
    );
    show_usage(&driver, "after map: per-task allocation")?;

    // Reduce stage.
    let t_red = Instant::now();
    let mut reds = Vec::new();
    for j in 0..args.reducers {
        let client = pool.client()?;
        let mappers = args.mappers;
        let ctl_path = format!("{JOB}/ctl");
        reds.push(std::thread::spawn(move || -> Result<(), DemoError> {
            let task = client.task(&format!("{JOB}/reduce/r{j}"))?;
            let mut counts = HashMap::new();
            for i in 0..mappers {
                let path = format!("{JOB}/map/m{i}/p{j}");
                let blocks = client.open_blocks(&path, false)?;
                decode_counts(&read_stream(&blocks)?, &mut counts, &path)?;
            }
            let data = encode_counts(&counts);
            let out = task.alloc(data.len() as u64 + 8)?;
            write_stream(&out, &data)?;
            let ctl = client.open_blocks(&ctl_path, true)?;
            if let Some(c) = ctl.first() {
                c.faa(0, 1)?;
            }
            task.finish()?;
            Ok(())
        }));
    }
    join_all(reds)?;
    let mut done = [0u8; 8];
    counter[0].read(0, &mut done)?;
    println!(
        "\nreduce stage: {} of {} reducers reported done (fetch-and-add counter) in {:.1} ms",
        u64::from_le_bytes(done),
        args.reducers,
        t_red.elapsed().as_secs_f64() * 1e3
    );
    show_usage(&driver, "after reduce")?;

    // The shuffle data is no longer needed: reclaim it now rather than at job end.
    let freed = driver.remove(&format!("{JOB}/map"))?;
    show_usage(
        &driver,
        &format!("after removing {JOB}/map ({freed} blocks freed)"),
    )?;

    // Collect and verify.
    let mut total = HashMap::new();
    for j in 0..args.reducers {
        let path = format!("{JOB}/reduce/r{j}");
        let blocks = driver.open_blocks(&path, false)?;
        decode_counts(&read_stream(&blocks)?, &mut total, &path)?;
    }
    let expected = count_words(&text);
    if total != expected {
        return Err(DemoError::Mismatch(format!(
            "{} distinct words from the pool, {} counted locally",
            total.len(),
            expected.len()
        )));
    }
    let mut top: Vec<(&String, &u64)> = total.iter().collect();
    top.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    println!("\ntop words:");
    for (w, c) in top.iter().take(8) {
        println!("   {w:<14} {c:>8}");
    }

    ctl.close()?;
    let removed = driver.remove(JOB)?;
    let left = show_usage(
        &driver,
        &format!("after removing {JOB} ({removed} blocks freed)"),
    )?;
    if left > baseline {
        return Err(DemoError::Leak(left - baseline));
    }
    let st = driver.status()?;
    println!(
        "\nsummary: {} words, {} distinct, verified against a local count; {} blocks allocated and {} freed; all memory reclaimed; {:.1} ms total",
        total.values().sum::<u64>(),
        total.len(),
        st.blocks_allocated_total,
        st.blocks_freed_total,
        started.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corpus_is_deterministic_and_counts_round_trip() {
        let a = generate_corpus(1000);
        assert_eq!(a, generate_corpus(1000));
        let counts = count_words(&a);
        assert_eq!(counts.values().sum::<u64>(), 1000);
        let mut back = HashMap::new();
        decode_counts(&encode_counts(&counts), &mut back, "t").unwrap();
        assert_eq!(back, counts);
        assert!(decode_counts(b"no-tab\n", &mut back, "t").is_err());
    }
}
