//! `punch-sim matrix [SEEDS]`: prints the NAT matrix (direct runs per
//! cell, controlling side down the rows) and each cell's details.
//! `punch-sim run A B SEED`: one run of model A (controlling) against B.

use std::time::{Duration, Instant};

const USAGE: &str =
    "usage: punch-sim matrix [SEEDS] | punch-sim run A B SEED   (20 ms links, 1 % loss)";

fn fail(msg: &str) -> ! {
    eprintln!("{msg}");
    std::process::exit(2);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let models = punch_sim::models();
    let model = |name: &str| {
        models
            .iter()
            .find(|m| m.name == name)
            .map(|m| m.nat)
            .unwrap_or_else(|| {
                let names: Vec<_> = models.iter().map(|m| m.name).collect();
                fail(&format!(
                    "unknown model {name:?}; models: {}",
                    names.join(", ")
                ))
            })
    };
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["matrix", ref rest @ ..] if rest.len() <= 1 => {
            let seeds = match rest.first().map(|s| s.parse::<u32>()) {
                None => 20,
                Some(Ok(n)) if n > 0 => n,
                Some(_) => fail("SEEDS must be a positive number"),
            };
            let t = Instant::now();
            let cells = punch_sim::matrix(&models, seeds, Duration::from_millis(20), 0.01);
            print!("{}", punch_sim::matrix::table(&models, &cells));
            println!();
            print!("{}", punch_sim::matrix::details(&cells));
            println!(
                "\n{} runs in {:.1?}",
                cells.len() as u32 * seeds,
                t.elapsed()
            );
        }
        ["run", a, b, seed] => {
            let seed = seed
                .parse()
                .unwrap_or_else(|_| fail("SEED must be a number"));
            let s = punch_sim::Scenario::new(model(a), model(b), seed);
            println!("{:#?}", punch_sim::run(&s));
        }
        _ => fail(USAGE),
    }
}
