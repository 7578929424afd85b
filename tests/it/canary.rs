//! Canary deploys under load: a bad version rolled back on its own at its first step, a good
//! one promoted to 100 % with no failed request, `abort` and `promote` mid-way, and a reload
//! refused while a canary runs.

use std::time::Duration;

use super::harness::*;

fn chaos(version: &str, extra_env: &str, canary: &str) -> WorkerDef {
    WorkerDef::chaos(
        "w",
        "[\"/\"]",
        2,
        &format!(
            "env: {{ CHAOS_VERSION: \"{version}\"{extra_env} }}\n\
             deploy: {{ strategy: canary, canary: {canary} }}\n"
        ),
    )
}

/// A deploy started in the background; its CLI output once it returns.
fn deploy_in_background(env: &Env) -> std::thread::JoinHandle<std::process::Output> {
    let (bin, conf) = (TQPROXY.to_string(), env.conf());
    std::thread::spawn(move || {
        std::process::Command::new(bin)
            .arg("-c")
            .arg(conf)
            .args(["deploy", "w"])
            .output()
            .expect("tqproxy deploy")
    })
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn wait_canary(env: &Env, share: &str) {
    wait_for(
        &format!("a canary at {share}"),
        Duration::from_secs(30),
        || {
            env.worker("w")
                .canary
                .filter(|c| c.share == share)
                .map(|_| ())
        },
    );
}

#[test]
fn a_version_failing_a_fifth_of_requests_is_rolled_back_at_its_first_step() {
    let mut env = Env::new(&[chaos("1", "", "{}")]);
    env.start();
    let load = Load::start(env.listen, "/", 4);
    load.wait_progress(200);
    env.write_worker(&chaos(
        "2",
        ", CHAOS_ERROR_PERMILLE: \"200\"",
        "{ steps: [10%, 50%, 100%], step_interval: 5s, max_error_rate: 0.01, min_requests: 50 }",
    ));
    let o = env.cli(&["deploy", "w"]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    // "canary error rate 0.19 > 0.01 over 62 requests at step 10% (old generation 0.00 …)"
    let rate: f64 = out
        .split("canary error rate ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no error rate in: {out}"));
    assert!((0.1..=0.3).contains(&rate), "{out}");
    assert!(
        out.contains("> 0.01 over") && out.contains("at step 10%"),
        "{out}"
    );
    assert!(out.contains("generation 1 keeps serving"), "{out}");
    let w = env.worker("w");
    assert!(w.canary.is_none(), "{w:?}");
    assert_eq!(w.generation, 1);
    assert!(
        w.instances.iter().all(|i| i.generation == 1),
        "the canary's instances are gone: {:?}",
        w.instances
    );
    load.wait_progress(100);
    let (ok, failed, errors) = load.finish();
    // Every failure is one of the canary's 500s: its share (10 %) of the requests of the
    // window it took to reach `min_requests`, times its error rate (20 %).
    eprintln!("bad canary: {failed} failed of {} requests", ok + failed);
    assert!(
        errors.iter().all(|e| e.starts_with("status 500")),
        "{:?}",
        &errors[..errors.len().min(5)]
    );
    assert!(failed >= 1, "the canary did fail some requests");
    assert!(
        failed <= 50,
        "bounded by share × window: {failed} of {}",
        ok + failed
    );
}

#[test]
fn a_good_version_is_promoted_to_all_requests_with_none_failed() {
    let mut env = Env::new(&[chaos("1", "", "{}")]);
    env.start();
    let load = Load::start(env.listen, "/", 4);
    load.wait_progress(200);
    env.write_worker(&chaos(
        "2",
        "",
        "{ steps: [10%, 50%, 100%], step_interval: 1s, min_requests: 20 }",
    ));
    let o = env.cli(&["deploy", "w"]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("promoted to 100% at step 3 of 3"), "{out}");
    let w = env.worker("w");
    assert_eq!(w.generation, 2);
    assert!(w.instances.iter().all(|i| i.generation == 2), "{w:?}");
    assert_eq!(env.get("/version").body.trim(), "2");
    load.wait_progress(100);
    load.finish_without_failures("a good canary");
}

#[test]
fn abort_mid_way_leaves_the_old_generation_serving() {
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut env = Env::with_global(
        &[chaos("1", "", "{}")],
        &format!("control: {{ admin: \"{admin}\" }}\n"),
    );
    env.start();
    let load = Load::start(env.listen, "/", 4);
    load.wait_progress(100);
    env.write_worker(&chaos(
        "2",
        "",
        "{ steps: [25%, 100%], step_interval: 60s, min_requests: 10 }",
    ));
    let deploy = deploy_in_background(&env);
    wait_canary(&env, "25%");
    // Both generations answer, the canary about a quarter.
    load.wait_progress(300);
    let st = env.status();
    let w = &st.workers[0];
    let c = w.canary.as_ref().expect("canary status");
    assert_eq!((c.generation, c.baseline, c.step, c.steps), (2, 1, 1, 2));
    assert!(
        w.generations
            .iter()
            .any(|g| g.generation == 2 && g.requests > 0),
        "{:?}",
        w.generations
    );
    let metrics = http_get(admin, "/metrics", None).body;
    assert!(
        metrics.contains("tqproxy_canary_share_permille{generation=\"2\",worker=\"w\"} 250"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tqproxy_generation_requests_total{generation=\"2\",worker=\"w\"}"),
        "{metrics}"
    );
    // A reload now is refused for this worker, with the reason.
    let o = env.cli(&["reload"]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(
        text(&o).contains("canary deploy is running"),
        "{}",
        text(&o)
    );
    let o = env.cli(&["abort", "w"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = deploy.join().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("aborted by `tqproxy abort`"),
        "{}",
        text(&o)
    );
    let w = env.worker("w");
    assert_eq!(w.generation, 1);
    assert!(w.instances.iter().all(|i| i.generation == 1), "{w:?}");
    assert_eq!(env.get("/version").body.trim(), "1");
    load.wait_progress(100);
    load.finish_without_failures("an aborted canary");
    // Nothing left to abort or promote.
    let o = env.cli(&["promote", "w"]);
    assert_eq!(o.status.code(), Some(9), "{}", text(&o));
}

#[test]
fn promote_skips_the_remaining_steps() {
    let mut env = Env::new(&[chaos("1", "", "{}")]);
    env.start();
    let load = Load::start(env.listen, "/", 4);
    load.wait_progress(100);
    env.write_worker(&chaos(
        "2",
        "",
        "{ steps: [5%, 25%, 50%, 100%], step_interval: 60s, min_requests: 10 }",
    ));
    let deploy = deploy_in_background(&env);
    wait_canary(&env, "5%");
    let o = env.cli(&["promote", "w"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = deploy.join().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("at step 1 of 4 by `tqproxy promote`"),
        "{}",
        text(&o)
    );
    assert_eq!(env.get("/version").body.trim(), "2");
    load.wait_progress(100);
    load.finish_without_failures("a promoted canary");
}
