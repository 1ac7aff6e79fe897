//! The fuzz targets of `fuzz/` on stable, briefly: seed inputs (the documented example jobs,
//! real Genesys answers) mutated by a small deterministic mutator, fed to the same functions
//! (`dialer::fuzzing`). A failure prints the input that broke it. No broker needed.

use dialer::fuzzing;

/// Inputs per target: about ten seconds each in a debug build.
const ROUNDS: usize = 8_000;

/// Values that break parsers more often than random bytes do.
const DICTIONARY: &[&str] = &[
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999999999",
    "-1",
    "1e999",
    "-0.0",
    "null",
    "\"\"",
    "[]",
    "{}",
    "\"id\"",
    "\"expires_in\"",
    "\"jobId\"",
    "\"phoneNumber\"",
    "\"notBefore\"",
    "\"expiresAt\"",
    "\"9999-12-31T23:59:59Z\"",
    "\"0000-01-01T00:00:00Z\"",
    "\"+99999999999999999999\"",
    "Bearer ",
    "\u{0}",
    "\u{202e}",
    "\\u0000",
    "\\ud800",
    "é",
    "\n",
];

/// xorshift64*: deterministic, so a failure reproduces from the round number.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, seed: &[u8], seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut data = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(data.len() + 1);
        match rng.below(8) {
            0 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
            1 if !data.is_empty() => {
                let end = (at + 1 + rng.below(16)).min(data.len());
                data.drain(at.min(end)..end);
            }
            2 => {
                let word = DICTIONARY[rng.below(DICTIONARY.len())].as_bytes();
                data.splice(at..at, word.iter().copied());
            }
            3 => data.truncate(at),
            4 => {
                // A long run, as an oversized field would be.
                let byte = [b'A', b'9', b'f', b'"', b'{', b'['][rng.below(6)];
                let run = vec![byte; 1 + rng.below(100_000)];
                data.splice(at..at, run);
            }
            5 => {
                // Splice in part of another seed.
                let other = &seeds[rng.below(seeds.len())];
                let from = rng.below(other.len());
                let to = (from + rng.below(64)).min(other.len());
                data.splice(at..at, other[from..to].iter().copied());
            }
            6 => data.insert(at, rng.next() as u8),
            _ => {
                // Replace a number-looking byte run with a dictionary value.
                if let Some(start) = data.iter().position(|b| b.is_ascii_digit()) {
                    let end = data[start..]
                        .iter()
                        .position(|b| !b.is_ascii_digit())
                        .map_or(data.len(), |n| start + n);
                    let word = DICTIONARY[rng.below(3)].as_bytes();
                    data.splice(start..end, word.iter().copied());
                }
            }
        }
    }
    data
}

fn run(target: fn(&[u8]), seeds: &[Vec<u8>], salt: u64) {
    for seed in seeds {
        target(seed);
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ salt);
    for round in 0..ROUNDS {
        let seed = &seeds[rng.below(seeds.len())];
        let input = mutate(&mut rng, seed, seeds);
        let result = std::panic::catch_unwind(|| target(&input));
        if result.is_err() {
            panic!(
                "round {round}: the target failed on {:?}",
                String::from_utf8_lossy(&input[..input.len().min(2000)])
            );
        }
    }
}

fn job_seeds() -> Vec<Vec<u8>> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/examples");
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(dir)
        .expect("docs/examples")
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            path.to_str()?.ends_with(".job.json").then(|| {
                let mut seed = vec![0];
                seed.extend(std::fs::read(&path).expect("example"));
                seed
            })
        })
        .collect();
    assert!(seeds.len() >= 3, "the example jobs are the seeds");
    seeds.push(b"\x01msg-1\x00{\"agentUserId\":\"3f6d2b9e-8c1a-4e57-9b2d-5a7c0e1f0001\",\"phoneNumber\":\"4155552671\",\"defaultRegion\":\"US\"}".to_vec());
    seeds
}

fn answer_seeds() -> Vec<Vec<u8>> {
    let with = |status: u16, header: &str, body: &str| {
        let mut seed = (status - 100).to_be_bytes().to_vec();
        seed.extend(header.as_bytes());
        seed.push(0);
        seed.extend(body.as_bytes());
        seed
    };
    vec![
        with(
            429,
            "42",
            r#"{"message":"Rate limit exceeded the maximum. Retry the request in [42] seconds","code":"too.many.requests.retry.after","status":429,"contextId":"7b5d0c1e-2f3a-4b5c-8d9e-0f1a2b3c4d5e","details":[],"errors":[]}"#,
        ),
        with(
            404,
            "c-1",
            r#"{"message":"User 18ee7 is not a participant in the conversation.","code":"not.found","status":404,"contextId":"7b5d","details":[],"errors":[]}"#,
        ),
        with(
            200,
            "",
            r#"{"id":"3f6d2b9e-8c1a-4e57-9b2d-5a7c0e1f0001","name":"+14155552671","selfUri":"/api/v2/conversations/calls/3f6d2b9e-8c1a-4e57-9b2d-5a7c0e1f0001"}"#,
        ),
        with(
            200,
            "",
            r#"{"total":1,"pageSize":1,"results":[{"id":"3f6d2b9e-8c1a-4e57-9b2d-5a7c0e1f0001","state":"active"}]}"#,
        ),
        with(
            200,
            "",
            r#"{"access_token":"abc","token_type":"bearer","expires_in":86400}"#,
        ),
        with(
            401,
            "",
            r#"{"error":"invalid_client","description":"Invalid client credentials."}"#,
        ),
        with(502, "", "<html><body>Bad gateway</body></html>"),
        with(307, "", ""),
    ]
}

#[test]
fn the_job_parser_survives_mutated_jobs() {
    run(fuzzing::job_parser, &job_seeds(), 1);
}

#[test]
fn the_genesys_answer_parsers_survive_mutated_answers() {
    run(fuzzing::genesys_answers, &answer_seeds(), 2);
}
