use super::*;

const MS: Duration = Duration::from_millis(1);

fn settings(workers: usize, readiness: Readiness) -> Settings {
    Settings {
        workers,
        readiness,
        ready_timeout: Duration::from_secs(5),
        drain_timeout: Duration::from_secs(3),
        ..Settings::default()
    }
}

fn rel(id: &str) -> Release {
    Release {
        id: id.into(),
        dir: PathBuf::from(format!("/r/{id}")),
    }
}

/// Plays the driver: gives each spawned worker a pid from `next_pid`.
fn run(pool: &mut Pool, actions: Vec<Action>, next_pid: &mut i32, now: Instant) -> Vec<Action> {
    let mut out = Vec::new();
    let mut queue: std::collections::VecDeque<Action> = actions.into();
    while let Some(a) = queue.pop_front() {
        if let Action::Spawn {
            generation, index, ..
        } = &a
        {
            *next_pid += 1;
            queue.extend(pool.on(
                Event::Spawned {
                    generation: *generation,
                    index: *index,
                    pid: *next_pid,
                },
                now,
            ));
        }
        out.push(a);
    }
    out
}

/// Whether the pool asked the driver to start a reload now.
fn starts(a: &[Action]) -> bool {
    a.iter().any(|a| matches!(a, Action::StartReload))
}

fn spawns(a: &[Action]) -> usize {
    a.iter()
        .filter(|a| matches!(a, Action::Spawn { .. }))
        .count()
}

/// What `f` picks out of each action it matches.
fn pick<T>(a: &[Action], f: impl Fn(&Action) -> Option<T>) -> Vec<T> {
    a.iter().filter_map(f).collect()
}

fn signals(a: &[Action]) -> Vec<i32> {
    pick(a, |a| match a {
        Action::Signal { pid, .. } => Some(*pid),
        _ => None,
    })
}

fn kills(a: &[Action]) -> Vec<i32> {
    pick(a, |a| match a {
        Action::KillGroup { pid } => Some(*pid),
        _ => None,
    })
}

fn drains(a: &[Action]) -> Vec<i32> {
    pick(a, |a| match a {
        Action::DrainGroup { pid, .. } => Some(*pid),
        _ => None,
    })
}

fn outcome(a: &[Action]) -> Option<(Vec<Waiter>, Outcome)> {
    a.iter().find_map(|a| match a {
        Action::ReloadDone { waiters, outcome } => Some((waiters.clone(), outcome.clone())),
        _ => None,
    })
}

/// A pool with a live, ready first generation of `n` workers (pids 1..=n).
fn live_pool(n: usize) -> (Pool, i32, Instant) {
    let t0 = Instant::now();
    let mut pool = Pool::new(settings(n, Readiness::Notify));
    let mut pid = 0;
    let a = pool.on(Event::ReleaseResolved(Ok(rel("a"))), t0);
    let a = run(&mut pool, a, &mut pid, t0);
    assert_eq!(spawns(&a), n);
    let mut all = Vec::new();
    for i in 0..n {
        all.extend(pool.on(
            Event::Ready {
                generation: 1,
                index: i,
            },
            t0,
        ));
    }
    assert_eq!(
        all.iter()
            .filter(|a| **a == Action::Systemd(Systemd::Ready))
            .count(),
        1,
        "READY=1 once, when the last worker is ready"
    );
    (pool, pid, t0)
}

fn backgrounds(a: &[Action]) -> Vec<bool> {
    pick(a, |a| match a {
        Action::Spawn { background, .. } => Some(*background),
        _ => None,
    })
}

fn foregrounds(a: &[Action]) -> Vec<i32> {
    pick(a, |a| match a {
        Action::Foreground { pid } => Some(*pid),
        _ => None,
    })
}

#[test]
fn workers_start_in_the_background_only_while_others_serve() {
    let t0 = Instant::now();
    let mut pool = Pool::new(Settings {
        background_start: true,
        ..settings(2, Readiness::Notify)
    });
    let mut pid = 0;
    // The first generation: no one serves, full speed.
    let a = pool.on(Event::ReleaseResolved(Ok(rel("a"))), t0);
    let a = run(&mut pool, a, &mut pid, t0);
    assert_eq!(backgrounds(&a), vec![false, false]);
    for index in 0..2 {
        let a = pool.on(
            Event::Ready {
                generation: 1,
                index,
            },
            t0,
        );
        assert_eq!(foregrounds(&a), Vec::<i32>::new());
    }
    // A reload: in the background, each back in front when ready.
    assert!(starts(&pool.on(
        Event::ReloadRequested {
            waiter: None,
            confirm_within: None,
            canary: None,
        },
        t0
    )));
    let a = pool.on(Event::ReleaseResolved(Ok(rel("b"))), t0);
    let a = run(&mut pool, a, &mut pid, t0);
    assert_eq!(backgrounds(&a), vec![true, true]);
    let a = pool.on(
        Event::Ready {
            generation: 2,
            index: 0,
        },
        t0 + 5 * MS,
    );
    assert_eq!(foregrounds(&a), vec![3]);
    // One slow to get ready goes on at normal priority after
    // BACKGROUND_MAX, once; the tick is due then.
    assert_eq!(pool.next_deadline(), Some(t0 + BACKGROUND_MAX));
    let a = pool.on(Event::Tick, t0 + BACKGROUND_MAX - MS);
    assert_eq!(foregrounds(&a), Vec::<i32>::new());
    let a = pool.on(Event::Tick, t0 + BACKGROUND_MAX);
    assert_eq!(foregrounds(&a), vec![4]);
    let a = pool.on(
        Event::Ready {
            generation: 2,
            index: 1,
        },
        t0 + BACKGROUND_MAX + MS,
    );
    assert_eq!(foregrounds(&a), Vec::<i32>::new());
    // A crashed worker of the live generation is respawned in the
    // background while its sibling serves.
    let mut a = pool.on(
        Event::Exited {
            pid: 3,
            how: Exit::Signal {
                signal: 9,
                core: false,
            },
            tail: String::new(),
        },
        t0 + 2 * BACKGROUND_MAX,
    );
    let due = pool.next_deadline().expect("a respawn is due");
    a.extend(pool.on(Event::Tick, due));
    let a = run(&mut pool, a, &mut pid, due);
    assert_eq!(backgrounds(&a), vec![true]);
}

#[test]
fn without_background_start_every_worker_starts_in_front() {
    let (mut pool, mut pid, t0) = live_pool(2);
    assert!(starts(&pool.on(
        Event::ReloadRequested {
            waiter: None,
            confirm_within: None,
            canary: None,
        },
        t0
    )));
    let a = pool.on(Event::ReleaseResolved(Ok(rel("b"))), t0);
    let a = run(&mut pool, a, &mut pid, t0);
    assert_eq!(backgrounds(&a), vec![false, false]);
    let a = pool.on(
        Event::Ready {
            generation: 2,
            index: 0,
        },
        t0,
    );
    assert_eq!(foregrounds(&a), Vec::<i32>::new());
}

#[test]
fn first_generation_is_live_and_ready_by_time_in_auto_mode() {
    let t0 = Instant::now();
    let mut pool = Pool::new(settings(2, Readiness::Auto(Duration::from_secs(1))));
    let mut pid = 0;
    let a = pool.on(Event::ReleaseResolved(Ok(rel("a"))), t0);
    run(&mut pool, a, &mut pid, t0);
    assert_eq!(pool.live_pids(), vec![1, 2]);
    assert_eq!(pool.next_deadline(), Some(t0 + Duration::from_secs(1)));
    assert!(pool.on(Event::Tick, t0 + 999 * MS).is_empty());
    let a = pool.on(Event::Tick, t0 + Duration::from_secs(1));
    assert!(a.contains(&Action::Systemd(Systemd::Ready)));
    assert_eq!(pool.next_deadline(), None, "idle: nothing to wake up for");
}

#[test]
fn a_timed_readiness_does_not_count_time_spent_waiting_for_a_cpu() {
    let t0 = Instant::now();
    let mut pool = Pool::new(settings(2, Readiness::Delay(Duration::from_secs(1))));
    let mut pid = 0;
    let a = pool.on(Event::ReleaseResolved(Ok(rel("a"))), t0);
    run(&mut pool, a, &mut pid, t0);
    let t1 = t0 + Duration::from_secs(1);
    assert_eq!(pool.timed_readiness_due(t1), vec![1, 2]);
    // Worker 1 waited 700 ms for a CPU, worker 2 did not: only worker
    // 2 has had its second.
    assert!(
        pool.on(
            Event::CpuWaited {
                pid: 1,
                waited: 700 * MS
            },
            t1
        )
        .is_empty()
    );
    assert_eq!(pool.timed_readiness_due(t1), vec![2]);
    pool.on(Event::Tick, t1);
    assert_eq!(pool.next_deadline(), Some(t1 + 700 * MS));
    assert!(
        !pool
            .on(Event::Tick, t1 + 699 * MS)
            .contains(&Action::Systemd(Systemd::Ready))
    );
    // A smaller figure never shrinks what was measured.
    pool.on(
        Event::CpuWaited {
            pid: 1,
            waited: 100 * MS,
        },
        t1 + 699 * MS,
    );
    assert_eq!(pool.timed_readiness_due(t1 + 699 * MS), Vec::<i32>::new());
    let a = pool.on(Event::Tick, t1 + 700 * MS);
    assert!(a.contains(&Action::Systemd(Systemd::Ready)), "{a:?}");
}

#[test]
fn reload_swaps_only_when_every_new_worker_is_ready() {
    let (mut pool, mut pid, t0) = live_pool(2);
    assert!(starts(&pool.on(
        Event::ReloadRequested {
            waiter: Some(7),
            confirm_within: None,
            canary: None,
        },
        t0
    )));
    let a = pool.on(Event::ReleaseResolved(Ok(rel("b"))), t0);
    assert!(a.contains(&Action::Systemd(Systemd::Reloading)));
    run(&mut pool, a, &mut pid, t0);
    assert!(pool.reloading());
    let a = pool.on(
        Event::Ready {
            generation: 2,
            index: 0,
        },
        t0,
    );
    assert!(
        signals(&a).is_empty(),
        "old generation untouched until all are ready"
    );
    let a = pool.on(
        Event::Ready {
            generation: 2,
            index: 1,
        },
        t0,
    );
    assert_eq!(signals(&a), vec![1, 2], "old generation drained");
    assert_eq!(outcome(&a), Some((vec![7], Ok((2, "b".to_string())))));
    assert_eq!(pool.live_pids(), vec![3, 4]);
    // The old workers exit: the generation is gone.
    pool.on(
        Event::Exited {
            pid: 1,
            how: Exit::Code(0),
            tail: ("").to_string(),
        },
        t0,
    );
    let a = pool.on(
        Event::Exited {
            pid: 2,
            how: Exit::Code(0),
            tail: ("").to_string(),
        },
        t0,
    );
    assert!(
        a.contains(&Action::Log(
            Note::GenerationDrained,
            "generation 1 drained".into()
        )),
        "{a:?}"
    );
    // What the drained workers left in their groups is drained too, not
    // killed at once.
    assert_eq!(drains(&a), vec![1, 2], "{a:?}");
    assert!(kills(&a).is_empty(), "{a:?}");
    assert_eq!(pool.status(t0).generations.len(), 1);
}

#[test]
fn a_crashing_new_generation_is_killed_and_the_old_keeps_serving() {
    let (mut pool, mut pid, t0) = live_pool(2);
    assert!(starts(&pool.on(
        Event::ReloadRequested {
            waiter: Some(1),
            confirm_within: None,
            canary: None,
        },
        t0
    )));
    let a = pool.on(Event::ReleaseResolved(Ok(rel("bad"))), t0);
    run(&mut pool, a, &mut pid, t0);
    let a = pool.on(
        Event::Exited {
            pid: 3,
            how: Exit::Code(3),
            tail: ("boom: config missing").to_string(),
        },
        t0,
    );
    assert_eq!(kills(&a), vec![4], "its sibling is killed");
    let (w, o) = outcome(&a).unwrap();
    assert_eq!(w, vec![1]);
    let err = o.unwrap_err();
    assert!(
        err.contains("exited with status 3") && err.contains("boom: config missing"),
        "{err}"
    );
    assert_eq!(pool.live_pids(), vec![1, 2]);
    assert!(
        signals(&a).is_empty(),
        "the old generation is never signalled"
    );
    assert_eq!(pool.live_release().unwrap().id, "a");
}

#[test]
fn a_never_ready_generation_times_out() {
    let (mut pool, mut pid, t0) = live_pool(1);
    pool.on(
        Event::ReloadRequested {
            waiter: None,
            confirm_within: None,
            canary: None,
        },
        t0,
    );
    let a = pool.on(Event::ReleaseResolved(Ok(rel("slow"))), t0);
    run(&mut pool, a, &mut pid, t0);
    assert_eq!(pool.next_deadline(), Some(t0 + Duration::from_secs(5)));
    let a = pool.on(Event::Tick, t0 + Duration::from_secs(5));
    assert_eq!(kills(&a), vec![2]);
    let err = outcome(&a).unwrap().1.unwrap_err();
    assert!(err.contains("not ready within 5s"), "{err}");
    assert_eq!(pool.live_pids(), vec![1]);
}

#[test]
fn reloads_during_a_reload_are_queued_and_coalesced() {
    let (mut pool, mut pid, t0) = live_pool(1);
    assert!(starts(&pool.on(
        Event::ReloadRequested {
            waiter: Some(1),
            confirm_within: None,
            canary: None,
        },
        t0
    )));
    let a = pool.on(Event::ReleaseResolved(Ok(rel("b"))), t0);
    run(&mut pool, a, &mut pid, t0);
    for w in 2..52 {
        assert!(
            !starts(&pool.on(
                Event::ReloadRequested {
                    waiter: Some(w),
                    confirm_within: None,
                    canary: None,
                },
                t0
            )),
            "queued, not started"
        );
    }
    let a = pool.on(
        Event::Ready {
            generation: 2,
            index: 0,
        },
        t0,
    );
    assert_eq!(outcome(&a).unwrap().0, vec![1]);
    assert_eq!(a.iter().filter(|a| **a == Action::StartReload).count(), 1);
    let a = pool.on(Event::ReleaseResolved(Ok(rel("c"))), t0);
    run(&mut pool, a, &mut pid, t0);
    let a = pool.on(
        Event::Ready {
            generation: 3,
            index: 0,
        },
        t0,
    );
    let (waiters, o) = outcome(&a).unwrap();
    assert_eq!(
        waiters,
        (2..52).collect::<Vec<_>>(),
        "every queued request answered once"
    );
    assert_eq!(o, Ok((3, "c".into())));
    assert!(!a.contains(&Action::StartReload), "the burst converged");
}

#[test]
fn crash_before_ready_backs_off_exponentially() {
    assert_eq!(backoff(0), Duration::ZERO);
    assert_eq!(backoff(1), 100 * MS);
    assert_eq!(backoff(2), 200 * MS);
    assert_eq!(backoff(9), Duration::from_millis(25_600));
    assert_eq!(backoff(10), Duration::from_secs(30));
    assert_eq!(backoff(1000), Duration::from_secs(30));

    let t0 = Instant::now();
    let mut pool = Pool::new(settings(1, Readiness::Notify));
    let mut pid = 0;
    let a = pool.on(Event::ReleaseResolved(Ok(rel("a"))), t0);
    run(&mut pool, a, &mut pid, t0);
    let mut now = t0;
    for expected in [100, 200, 400, 800] {
        let a = pool.on(
            Event::Exited {
                pid,
                how: Exit::Code(1),
                tail: ("").to_string(),
            },
            now,
        );
        assert_eq!(spawns(&a), 0);
        assert_eq!(pool.next_deadline(), Some(now + expected * MS));
        now += expected * MS;
        let a = pool.on(Event::Tick, now);
        run(&mut pool, a, &mut pid, now);
    }
    // Ready, healthy for a minute, then a crash: restarted at once.
    pool.on(
        Event::Ready {
            generation: 1,
            index: 0,
        },
        now,
    );
    now += HEALTHY_AFTER;
    let a = pool.on(
        Event::Exited {
            pid,
            how: Exit::Signal {
                signal: 9,
                core: false,
            },
            tail: ("").to_string(),
        },
        now,
    );
    assert_eq!(spawns(&a), 1, "{a:?}");
    assert_eq!(pool.restarts, 5);
}

/// `sleep 0.5; exit 3` after READY=1 restarted "in 0ms" every time.
#[test]
fn crashes_soon_after_ready_back_off_too() {
    let (mut pool, mut pid, t0) = live_pool(1);
    let mut now = t0;
    for expected in [100, 200, 400, 800, 1600] {
        now += 500 * MS;
        let a = pool.on(
            Event::Exited {
                pid,
                how: Exit::Code(3),
                tail: ("").to_string(),
            },
            now,
        );
        assert_eq!(spawns(&a), 0, "restarted at once: {a:?}");
        assert_eq!(pool.next_deadline(), Some(now + expected * MS));
        now += expected * MS;
        let a = pool.on(Event::Tick, now);
        run(&mut pool, a, &mut pid, now);
        pool.on(
            Event::Ready {
                generation: 1,
                index: 0,
            },
            now,
        );
    }
}

#[test]
fn drain_deadline_kills_the_process_groups() {
    let (mut pool, mut pid, t0) = live_pool(1);
    pool.on(
        Event::ReloadRequested {
            waiter: None,
            confirm_within: None,
            canary: None,
        },
        t0,
    );
    let a = pool.on(Event::ReleaseResolved(Ok(rel("b"))), t0);
    run(&mut pool, a, &mut pid, t0);
    pool.on(
        Event::Ready {
            generation: 2,
            index: 0,
        },
        t0,
    );
    assert_eq!(pool.next_deadline(), Some(t0 + Duration::from_secs(3)));
    assert!(kills(&pool.on(Event::Tick, t0 + 2999 * MS)).is_empty());
    assert_eq!(
        kills(&pool.on(Event::Tick, t0 + Duration::from_secs(3))),
        vec![1]
    );
    assert!(
        kills(&pool.on(Event::Tick, t0 + Duration::from_secs(4))).is_empty(),
        "once"
    );
}

/// Rapid deploys killed generations still draining (a 10 MB download
/// cut at 8.6 MB). Now a reload waits until a draining generation has
/// drained or reached its own drain deadline.
#[test]
fn a_reload_waits_for_room_to_drain_instead_of_killing() {
    let (mut pool, mut pid, t0) = live_pool(1);
    pool.settings.max_draining = 2;
    // Two reloads leave generations 1 and 2 draining (pids 1 and 2).
    for (i, id) in ["b", "c"].iter().enumerate() {
        assert!(starts(&pool.on(
            Event::ReloadRequested {
                waiter: None,
                confirm_within: None,
                canary: None,
            },
            t0
        )));
        let a = pool.on(Event::ReleaseResolved(Ok(rel(id))), t0);
        run(&mut pool, a, &mut pid, t0);
        let a = pool.on(
            Event::Ready {
                generation: i as u64 + 2,
                index: 0,
            },
            t0,
        );
        assert!(kills(&a).is_empty(), "{a:?}");
    }
    // A third is held back: nothing starts, nothing is killed.
    assert!(!starts(&pool.on(
        Event::ReloadRequested {
            waiter: Some(7),
            confirm_within: None,
            canary: None,
        },
        t0
    )));
    assert!(pool.reload_held());
    assert!(
        pool.on(Event::Tick, t0 + MS)
            .iter()
            .all(|a| !matches!(a, Action::StartReload))
    );
    // Generation 1's worker finishes its requests and exits: room.
    let a = pool.on(
        Event::Exited {
            pid: 1,
            how: Exit::Code(0),
            tail: ("").to_string(),
        },
        t0 + 2 * MS,
    );
    assert_eq!(
        a.iter()
            .filter(|a| matches!(a, Action::StartReload))
            .count(),
        1,
        "{a:?}"
    );
    assert!(
        kills(&a).iter().all(|p| *p == 1),
        "only its own group: {a:?}"
    );
    let a = pool.on(Event::ReleaseResolved(Ok(rel("d"))), t0 + 2 * MS);
    run(&mut pool, a, &mut pid, t0);
    assert!(!pool.reload_held());
    // Held again behind generation 2, until its drain deadline.
    let a = pool.on(
        Event::Ready {
            generation: 4,
            index: 0,
        },
        t0 + 3 * MS,
    );
    assert!(kills(&a).is_empty(), "{a:?}");
    assert!(!starts(&pool.on(
        Event::ReloadRequested {
            waiter: None,
            confirm_within: None,
            canary: None,
        },
        t0
    )));
    let a = pool.on(Event::Tick, t0 + Duration::from_secs(3));
    assert!(a.iter().any(|a| matches!(a, Action::StartReload)), "{a:?}");
}

#[test]
fn graceful_stop_drains_then_finishes() {
    let (mut pool, _, t0) = live_pool(2);
    let a = pool.on(Event::Stop(Stop::Graceful), t0);
    assert_eq!(signals(&a), vec![1, 2]);
    assert!(!pool.finished());
    assert!(
        !starts(&pool.on(
            Event::ReloadRequested {
                waiter: Some(1),
                confirm_within: None,
                canary: None,
            },
            t0
        )),
        "no reloads while stopping"
    );
    pool.on(
        Event::Exited {
            pid: 1,
            how: Exit::Code(0),
            tail: ("").to_string(),
        },
        t0,
    );
    let a = pool.on(
        Event::Exited {
            pid: 2,
            how: Exit::Code(0),
            tail: ("").to_string(),
        },
        t0,
    );
    assert_eq!(spawns(&a), 0, "not respawned while stopping");
    assert!(pool.finished());
    // Fast stop kills at once.
    let (mut pool, _, t0) = live_pool(2);
    assert_eq!(kills(&pool.on(Event::Stop(Stop::Fast), t0)), vec![1, 2]);
}

#[test]
fn scale_up_and_down() {
    let (mut pool, mut pid, t0) = live_pool(2);
    let a = pool.on(Event::Scale(3), t0);
    let a = run(&mut pool, a, &mut pid, t0);
    assert_eq!(spawns(&a), 1);
    assert_eq!(pool.live_pids(), vec![1, 2, 3]);
    let a = pool.on(Event::Scale(1), t0);
    assert_eq!(signals(&a), vec![3, 2]);
    pool.on(
        Event::Exited {
            pid: 3,
            how: Exit::Code(0),
            tail: ("").to_string(),
        },
        t0,
    );
    let a = pool.on(
        Event::Exited {
            pid: 2,
            how: Exit::Code(0),
            tail: ("").to_string(),
        },
        t0,
    );
    assert_eq!(spawns(&a), 0, "retired workers are not respawned");
    assert_eq!(pool.live_pids(), vec![1]);
    assert_eq!(pool.status(t0).generations[0].workers.len(), 1);
}

#[test]
fn a_worker_scaled_down_while_its_spawn_is_in_flight_is_retired_not_kept() {
    let (mut pool, _, t0) = live_pool(2);
    let a = pool.on(Event::Scale(3), t0);
    assert_eq!(spawns(&a), 1, "{a:?}");
    // Scaled back down before the driver reported the pid.
    let a = pool.on(Event::Scale(2), t0);
    assert!(signals(&a).is_empty(), "{a:?}");
    let a = pool.on(
        Event::Spawned {
            generation: 1,
            index: 2,
            pid: 99,
        },
        t0,
    );
    assert_eq!(
        signals(&a),
        vec![99],
        "told to drain as soon as it has a pid"
    );
    let a = pool.on(
        Event::Exited {
            pid: 99,
            how: Exit::Code(0),
            tail: String::new(),
        },
        t0 + MS,
    );
    assert_eq!(spawns(&a), 0, "a retired worker is not respawned: {a:?}");
    assert!(kills(&a).is_empty(), "{a:?}");
    assert_eq!(
        drains(&a),
        vec![99],
        "what it left in its group is drained as it was"
    );
    let st = pool.status(t0 + MS);
    assert_eq!(st.generations[0].workers.len(), 2);
    // And a retiring worker does not hold a reload's promotion back.
    let a = pool.on(Event::Tick, t0 + 2 * MS);
    assert_eq!(spawns(&a), 0, "{a:?}");
}

/// Reloads a live pool of `n` (pids 1..=n, release a) to release b,
/// with `confirm_within`, and makes it live (pids n+1..=2n); the old
/// workers exit. Returns the time it went live.
fn reloaded_to_b(
    pool: &mut Pool,
    pid: &mut i32,
    t0: Instant,
    n: usize,
    confirm_within: Option<Duration>,
) -> Instant {
    let a = pool.on(
        Event::ReloadRequested {
            waiter: None,
            confirm_within,
            canary: None,
        },
        t0,
    );
    assert!(starts(&a));
    let a = pool.on(Event::ReleaseResolved(Ok(rel("b"))), t0);
    run(pool, a, pid, t0);
    for index in 0..n {
        pool.on(
            Event::Ready {
                generation: 2,
                index,
            },
            t0,
        );
    }
    for old in 1..=n as i32 {
        pool.on(exit(old, Exit::Code(0)), t0);
    }
    assert_eq!(pool.live_release().map(|r| r.id.as_str()), Some("b"));
    t0
}

fn exit(pid: i32, how: Exit) -> Event {
    Event::Exited {
        pid,
        how,
        tail: String::new(),
    }
}

fn reverted_to(a: &[Action]) -> Option<(String, String)> {
    a.iter().find_map(|a| match a {
        Action::Revert { release, to, .. } => Some((release.clone(), to.id.clone())),
        _ => None,
    })
}

#[test]
fn three_crashes_on_probation_revert_to_the_release_replaced() {
    let (mut pool, mut pid, t0) = live_pool(2);
    let live = reloaded_to_b(&mut pool, &mut pid, t0, 2, None);
    assert!(pool.status(live).generations[0].probation_s.is_some());
    // Worker 2.0 (pid 3) crashes a second after going live, again and
    // again; worker 2.1 stays up.
    let mut t = live + Duration::from_secs(1);
    let mut victim = 3;
    for crash in 1..=2 {
        let a = pool.on(exit(victim, Exit::Code(1)), t);
        assert_eq!(reverted_to(&a), None, "crash {crash}: {a:?}");
        t += Duration::from_millis(500);
        let a = pool.on(Event::Tick, t);
        let a = run(&mut pool, a, &mut pid, t);
        assert_eq!(spawns(&a), 1, "crash {crash}: respawned: {a:?}");
        victim = pid;
    }
    let a = pool.on(exit(victim, Exit::Code(1)), t);
    assert_eq!(reverted_to(&a), Some(("b".into(), "a".into())), "{a:?}");
    let a = run(&mut pool, a, &mut pid, t);
    assert_eq!(spawns(&a), 2, "a generation of a starts: {a:?}");
    assert_eq!(pool.status(t).reverts, 1);
    // Once it is ready, b drains and a is live, settled (a later
    // crash of a is respawned, never reverted back to b).
    let mut last = Vec::new();
    for index in 0..2 {
        last = pool.on(
            Event::Ready {
                generation: 3,
                index,
            },
            t,
        );
    }
    assert!(!signals(&last).is_empty(), "b drains: {last:?}");
    assert_eq!(pool.live_release().map(|r| r.id.as_str()), Some("a"));
    let s = pool.status(t);
    let g3 = s.generations.iter().find(|g| g.id == 3).unwrap();
    assert_eq!(g3.probation_s, None);
    let a = pool.on(exit(pid, Exit::Code(1)), t);
    assert_eq!(reverted_to(&a), None, "{a:?}");
}

fn settled(a: &[Action]) -> Vec<(Vec<Waiter>, Outcome)> {
    pick(a, |a| match a {
        Action::ReloadDone { waiters, outcome } => Some((waiters.clone(), outcome.clone())),
        _ => None,
    })
}

#[test]
fn settle_answers_at_the_end_of_its_window_or_at_a_revert() {
    let (mut pool, mut pid, t0) = live_pool(2);
    let live = reloaded_to_b(&mut pool, &mut pid, t0, 2, None);
    let within = Duration::from_secs(2);
    // Asked a little after it went live: the window counts from then.
    let a = pool.on(
        Event::Settle {
            generation: 2,
            within,
            waiter: 7,
        },
        live + 100 * MS,
    );
    assert!(settled(&a).is_empty(), "{a:?}");
    assert_eq!(pool.next_deadline(), Some(live + within));
    assert!(settled(&pool.on(Event::Tick, live + within - MS)).is_empty());
    let a = pool.on(Event::Tick, live + within);
    assert_eq!(settled(&a), vec![(vec![7], Ok((2, "b".to_string())))]);
    // A window already over is answered at once.
    let a = pool.on(
        Event::Settle {
            generation: 2,
            within,
            waiter: 8,
        },
        live + within,
    );
    assert_eq!(settled(&a), vec![(vec![8], Ok((2, "b".to_string())))]);
    // Three crashes in the window: reverted, and the waiter told so at
    // the next tick, not at the end of its window.
    let mut t = live + within;
    pool.on(
        Event::Settle {
            generation: 2,
            within: Duration::from_secs(30),
            waiter: 9,
        },
        t,
    );
    let mut victim = 3;
    let mut seen = Vec::new();
    for crash in 0..3 {
        let a = pool.on(exit(victim, Exit::Code(1)), t);
        assert_eq!(reverted_to(&a).is_some(), crash == 2, "{a:?}");
        seen.extend(settled(&a));
        t += Duration::from_millis(500);
        let a = pool.on(Event::Tick, t);
        seen.extend(settled(&a));
        run(&mut pool, a, &mut pid, t);
        victim = pid;
    }
    let got = seen;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, vec![9]);
    let why = got[0].1.clone().unwrap_err();
    assert!(why.contains("reverted"), "{why}");
}

#[test]
fn one_crash_on_probation_is_forgiven_and_probation_ends() {
    let (mut pool, mut pid, t0) = live_pool(2);
    let live = reloaded_to_b(&mut pool, &mut pid, t0, 2, None);
    let t = live + Duration::from_secs(1);
    let a = pool.on(exit(3, Exit::Code(1)), t);
    assert_eq!(reverted_to(&a), None);
    // Probation (10 s by default) ends by time: later crashes are
    // ordinary respawns.
    let after = live + Duration::from_secs(11);
    assert!(
        pool.next_deadline()
            .is_some_and(|d| d <= live + Duration::from_secs(10))
    );
    let a = pool.on(Event::Tick, after);
    run(&mut pool, a, &mut pid, after);
    assert_eq!(pool.status(after).generations[0].probation_s, None);
    for _ in 0..5 {
        let a = pool.on(exit(4, Exit::Code(1)), after);
        assert_eq!(reverted_to(&a), None, "{a:?}");
        let a = pool.on(Event::Tick, after + Duration::from_secs(60));
        run(&mut pool, a, &mut pid, after);
    }
    assert_eq!(pool.live_release().map(|r| r.id.as_str()), Some("b"));
}

#[test]
fn all_workers_down_at_once_on_probation_reverts() {
    let (mut pool, mut pid, t0) = live_pool(2);
    let live = reloaded_to_b(&mut pool, &mut pid, t0, 2, None);
    let t = live + Duration::from_secs(1);
    assert_eq!(
        reverted_to(&pool.on(
            exit(
                3,
                Exit::Signal {
                    signal: 11,
                    core: false
                }
            ),
            t
        )),
        None
    );
    let a = pool.on(
        exit(
            4,
            Exit::Signal {
                signal: 11,
                core: false,
            },
        ),
        t,
    );
    assert_eq!(reverted_to(&a), Some(("b".into(), "a".into())), "{a:?}");
}

#[test]
fn a_provisional_generation_reverts_unless_confirmed_in_time() {
    let within = Duration::from_secs(5);
    // Not confirmed: reverted at its deadline, and confirming it later
    // says why.
    let (mut pool, mut pid, t0) = live_pool(1);
    let live = reloaded_to_b(&mut pool, &mut pid, t0, 1, Some(within));
    assert!(pool.status(live).generations[0].confirm_in_s.is_some());
    assert!(pool.next_deadline().is_some_and(|d| d <= live + within));
    let a = pool.on(Event::Tick, live + within);
    assert_eq!(reverted_to(&a), Some(("b".into(), "a".into())), "{a:?}");
    let a = pool.on(
        Event::Confirm {
            generation: Some(2),
            waiter: Some(9),
        },
        live + within,
    );
    let (waiters, answer) = outcome(&a).expect("answered");
    assert_eq!(waiters, vec![9]);
    assert!(
        answer
            .as_ref()
            .is_err_and(|e| e.contains("not confirmed within 5s")),
        "{answer:?}"
    );
    // Confirmed in time: it stays, past the deadline too.
    let (mut pool, mut pid, t0) = live_pool(1);
    let live = reloaded_to_b(&mut pool, &mut pid, t0, 1, Some(within));
    let a = pool.on(
        Event::Confirm {
            generation: None,
            waiter: Some(9),
        },
        live + Duration::from_secs(1),
    );
    assert_eq!(outcome(&a), Some((vec![9], Ok((2, "b".to_string())))));
    let a = pool.on(Event::Tick, live + within + Duration::from_secs(60));
    assert_eq!(reverted_to(&a), None, "{a:?}");
    assert_eq!(pool.live_release().map(|r| r.id.as_str()), Some("b"));
}

#[test]
fn an_extended_generation_reverts_that_long_after_its_last_extension() {
    let within = Duration::from_secs(5);
    let (mut pool, mut pid, t0) = live_pool(1);
    let live = reloaded_to_b(&mut pool, &mut pid, t0, 1, Some(within));
    let extend = |pool: &mut Pool, by: u64, at: Instant| {
        pool.on(
            Event::Extend {
                generation: 2,
                within: Duration::from_secs(by),
                waiter: Some(9),
            },
            at,
        )
    };
    // Renewed twice: alive at 12 s, past the first deadline.
    let mut at = live;
    for _ in 0..2 {
        at += Duration::from_secs(4);
        let a = extend(&mut pool, 5, at);
        assert_eq!(outcome(&a), Some((vec![9], Ok((2, "b".to_string())))));
    }
    let a = pool.on(Event::Tick, at + Duration::from_secs(4));
    assert_eq!(reverted_to(&a), None, "{a:?}");
    // A shorter extension never brings the deadline closer.
    extend(&mut pool, 1, at + Duration::from_secs(4));
    let a = pool.on(Event::Tick, at + Duration::from_millis(4900));
    assert_eq!(reverted_to(&a), None, "{a:?}");
    // Not renewed: reverted at the last deadline.
    let a = pool.on(Event::Tick, at + within);
    assert_eq!(reverted_to(&a), Some(("b".into(), "a".into())), "{a:?}");
    // Renewing a reverted generation answers why.
    let a = extend(&mut pool, 5, at + within);
    let (_, answer) = outcome(&a).expect("answered");
    assert!(answer.is_err(), "{answer:?}");
}

/// A provisional generation replaced by a later reload before its
/// deadline: the deadline passes while it drains, and nothing is reverted
/// (CI: a fleet deploy right after a killed one was undone by the killed
/// one's deadline, 38 ms after it went live); the unconfirmed release is
/// not what the new one goes back to.
#[test]
fn a_provisional_generation_replaced_before_its_deadline_reverts_nothing() {
    let within = Duration::from_secs(3);
    let (mut pool, mut pid, t0) = live_pool(1);
    let live = reloaded_to_b(&mut pool, &mut pid, t0, 1, Some(within));
    // Generation 3 (release c) goes live 38 ms before 2's deadline.
    let t = live + within - Duration::from_millis(38);
    let a = pool.on(
        Event::ReloadRequested {
            waiter: None,
            confirm_within: Some(Duration::from_secs(30)),
            canary: None,
        },
        t,
    );
    assert!(starts(&a));
    let a = pool.on(Event::ReleaseResolved(Ok(rel("c"))), t);
    run(&mut pool, a, &mut pid, t);
    pool.on(
        Event::Ready {
            generation: 3,
            index: 0,
        },
        t,
    );
    assert_eq!(pool.live_release().map(|r| r.id.as_str()), Some("c"));
    // Generation 2 still drains at its deadline, and after it.
    for late in [0, 100, 5000] {
        let a = pool.on(Event::Tick, live + within + Duration::from_millis(late));
        assert_eq!(reverted_to(&a), None, "{a:?}");
        assert!(!starts(&a), "{a:?}");
    }
    assert_eq!(pool.live_release().map(|r| r.id.as_str()), Some("c"));
    // The live one is still on its own trial: unconfirmed, it reverts, to
    // the release before the unconfirmed one it replaced.
    let a = pool.on(Event::Tick, t + Duration::from_secs(30));
    assert_eq!(reverted_to(&a), Some(("c".into(), "a".into())), "{a:?}");
}

#[test]
fn the_first_generation_has_nothing_to_revert_to() {
    let (mut pool, mut pid, t0) = live_pool(1);
    for i in 0..5 {
        let t = t0 + Duration::from_secs(i);
        let a = pool.on(exit(pid, Exit::Code(1)), t);
        assert_eq!(reverted_to(&a), None);
        let a = pool.on(Event::Tick, t + Duration::from_secs(31));
        run(&mut pool, a, &mut pid, t);
    }
}

#[test]
fn readiness_parses() {
    assert_eq!("notify".parse(), Ok(Readiness::Notify));
    assert_eq!("fd:5".parse(), Ok(Readiness::Fd(5)));
    assert!("fd:1".parse::<Readiness>().is_err());
    assert!("fd:x".parse::<Readiness>().is_err());
    assert_eq!(
        "delay:2s".parse(),
        Ok(Readiness::Delay(Duration::from_secs(2)))
    );
    assert_eq!("auto:500ms".parse(), Ok(Readiness::Auto(500 * MS)));
    assert!("sometimes".parse::<Readiness>().is_err());
    assert!("delay:x".parse::<Readiness>().is_err());
}

/// Wakes the pool at each deadline it names, as the driver does, until
/// it names none or `until`: every wake-up must do something or name a
/// later deadline; one that does neither is a busy loop in `poll`.
fn wake_at_deadlines(pool: &mut Pool, next_pid: &mut i32, until: Instant) {
    for _ in 0..1000 {
        let Some(due) = pool.next_deadline() else {
            return;
        };
        if due > until {
            return;
        }
        let a = pool.on(Event::Tick, due);
        let did = !a.is_empty();
        run(pool, a, next_pid, due);
        let next = pool.next_deadline();
        assert!(
            did || next.is_none_or(|n| n > due),
            "a deadline that wakes the driver for nothing, again and again: {due:?}"
        );
    }
    panic!("more than 1000 wake-ups");
}

#[test]
fn a_stopping_pool_is_never_woken_for_nothing() {
    // Never ready, then stopped: the first generation's ready timeout
    // is no longer a deadline while its workers drain.
    let t0 = Instant::now();
    let mut pool = Pool::new(settings(2, Readiness::Notify));
    let mut pid = 0;
    let a = pool.on(Event::ReleaseResolved(Ok(rel("a"))), t0);
    run(&mut pool, a, &mut pid, t0);
    pool.on(Event::Stop(Stop::Graceful), t0 + MS);
    wake_at_deadlines(&mut pool, &mut pid, t0 + Duration::from_secs(60));
    // Randomized rounds: crashes, reloads, confirmations and stops in
    // any order, each followed by every deadline up to a point.
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64 ^ t0.elapsed().as_nanos() as u64;
    let mut next = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for _ in 0..200 {
        let (mut pool, mut pid, t0) = live_pool(2);
        let mut t = t0;
        for _ in 0..6 {
            t += Duration::from_millis(next(4000));
            let event = match next(5) {
                0 => exit(1 + next(pid as u64) as i32, Exit::Code(1)),
                1 => Event::ReloadRequested {
                    waiter: None,
                    confirm_within: next(2).checked_sub(1).map(|_| Duration::from_secs(2)),
                    canary: None,
                },
                2 => Event::Stop(Stop::Graceful),
                3 => Event::Ready {
                    generation: 2,
                    index: next(2) as usize,
                },
                _ => exit(1 + next(pid as u64) as i32, Exit::Code(0)),
            };
            let mut a = pool.on(event, t);
            if starts(&a) {
                a.extend(pool.on(Event::ReleaseResolved(Ok(rel("b"))), t));
            }
            run(&mut pool, a, &mut pid, t);
            let until = t + Duration::from_millis(next(10_000));
            wake_at_deadlines(&mut pool, &mut pid, until);
        }
    }
}

/// A canary of `release` (1 worker of the pool's) asked for by waiter 9,
/// started and ready at `t`: its generation's id.
fn canary_ready(pool: &mut Pool, pid: &mut i32, release: &str, t: Instant) -> GenId {
    use crate::supervise::canary::judge::{Share, Spec};
    let plan = Spec::new(Share::Workers(1))
        .plan(pool.settings().workers)
        .unwrap();
    let a = pool.on(
        Event::ReloadRequested {
            waiter: Some(9),
            confirm_within: None,
            canary: Some(plan),
        },
        t,
    );
    assert!(starts(&a));
    let a = pool.on(Event::ReleaseResolved(Ok(rel(release))), t);
    let a = run(pool, a, pid, t);
    assert_eq!(spawns(&a), 1, "one canary worker");
    assert!(
        a.iter().all(|a| !matches!(
            a,
            Action::Spawn {
                lane: Lane::Main | Lane::Twin,
                ..
            }
        )),
        "on the canary's listeners"
    );
    let generation = pool.generation_ids().last().copied().unwrap();
    let a = pool.on(
        Event::Ready {
            generation,
            index: 0,
        },
        t,
    );
    assert!(
        a.iter()
            .any(|a| matches!(a, Action::CanaryLive { baseline, .. } if baseline == "a")),
        "{a:?}"
    );
    assert!(outcome(&a).is_none(), "the waiter waits for the verdict");
    assert_eq!(pool.live_release().map(|r| r.id.as_str()), Some("a"));
    generation
}

#[test]
fn a_reverted_canary_drains_alone_and_the_live_generation_is_untouched() {
    let (mut pool, mut pid, t0) = live_pool(4);
    let g = canary_ready(&mut pool, &mut pid, "b", t0);
    let a = pool.on(
        Event::Judged {
            generation: g,
            verdict: Err("error rate".into()),
        },
        t0 + MS,
    );
    // The share goes back first, then its one worker is told to drain.
    let ended = a
        .iter()
        .position(|a| matches!(a, Action::CanaryEnded { .. }))
        .expect("ended");
    let signalled = a
        .iter()
        .position(|a| matches!(a, Action::Signal { .. }))
        .expect("drained");
    assert!(ended < signalled, "{a:?}");
    assert_eq!(signals(&a), vec![pid], "only the canary's worker");
    assert!(
        a.iter()
            .any(|a| matches!(a, Action::Revert { to, .. } if to.id == "a"))
    );
    assert!(matches!(outcome(&a), Some((w, Err(e))) if w == vec![9] && e.contains("error rate")));
    assert!(!starts(&a), "nothing else moves");
    assert_eq!(pool.live_pids(), vec![1, 2, 3, 4]);
    assert_eq!(pool.reverts, 1);
}

#[test]
fn a_promoted_canary_serves_until_its_full_generation_is_live() {
    let (mut pool, mut pid, t0) = live_pool(2);
    let g = canary_ready(&mut pool, &mut pid, "b", t0);
    let canary_pid = pid;
    let a = pool.on(
        Event::Judged {
            generation: g,
            verdict: Ok("figures".into()),
        },
        t0 + MS,
    );
    assert!(starts(&a), "its promotion is a reload: {a:?}");
    assert!(signals(&a).is_empty(), "nobody drains yet");
    assert!(a.iter().any(|a| matches!(a, Action::Promoted { .. })));
    let a = pool.on(Event::ReleaseResolved(Ok(rel("b"))), t0 + MS);
    let a = run(&mut pool, a, &mut pid, t0 + MS);
    assert_eq!(spawns(&a), 2, "a full generation");
    let full = pool.generation_ids().last().copied().unwrap();
    let mut a = Vec::new();
    for index in 0..2 {
        a.extend(pool.on(
            Event::Ready {
                generation: full,
                index,
            },
            t0 + 2 * MS,
        ));
    }
    let mut drained = signals(&a);
    drained.sort();
    assert_eq!(
        drained,
        vec![1, 2, canary_pid],
        "old and canary drain together"
    );
    assert!(
        a.iter()
            .any(|a| matches!(a, Action::CanaryEnded { generation } if *generation == g))
    );
    assert!(
        matches!(outcome(&a), Some((w, Ok((id, r)))) if w == vec![9] && id == full && r == "b")
    );
}

#[test]
fn a_canary_worker_that_exits_reverts_it_and_a_reload_withdraws_it() {
    let (mut pool, mut pid, t0) = live_pool(4);
    let g = canary_ready(&mut pool, &mut pid, "b", t0);
    let a = pool.on(
        Event::Exited {
            pid,
            how: Exit::Code(3),
            tail: String::new(),
        },
        t0 + MS,
    );
    assert!(
        a.iter().any(|a| matches!(a, Action::Revert { .. })),
        "{a:?}"
    );
    assert!(matches!(outcome(&a), Some((_, Err(e))) if e.contains("exited")));
    assert!(!pool.generation_ids().contains(&g) || pool.canary().is_none());

    // A plain reload during a canary's window ends it without a verdict.
    let (mut pool, mut pid, t0) = live_pool(4);
    canary_ready(&mut pool, &mut pid, "b", t0);
    let a = pool.on(
        Event::ReloadRequested {
            waiter: Some(3),
            confirm_within: None,
            canary: None,
        },
        t0 + MS,
    );
    assert!(
        !a.iter().any(|a| matches!(a, Action::Revert { .. })),
        "nothing marked bad"
    );
    assert!(matches!(outcome(&a), Some((w, Err(e))) if w == vec![9] && e.contains("withdrawn")));
    assert!(starts(&a));
}

#[test]
fn a_canary_judged_on_requests_starts_with_a_twin_and_ends_with_it() {
    use crate::supervise::canary::judge::{Share, Spec};
    let (mut pool, mut pid, t0) = live_pool(4);
    let mut spec = Spec::new(Share::Workers(1));
    spec.judge_path = Some("/".into());
    let plan = spec.plan(4).unwrap();
    assert!(plan.twin);
    let a = pool.on(
        Event::ReloadRequested {
            waiter: Some(9),
            confirm_within: None,
            canary: Some(plan),
        },
        t0,
    );
    assert!(starts(&a));
    let a = pool.on(Event::ReleaseResolved(Ok(rel("b"))), t0);
    let a = run(&mut pool, a, &mut pid, t0);
    let lanes: Vec<(Lane, String)> = pick(&a, |a| match a {
        Action::Spawn { lane, release, .. } => Some((*lane, release.id.clone())),
        _ => None,
    });
    assert_eq!(
        lanes,
        vec![(Lane::Canary, "b".into()), (Lane::Twin, "a".into())],
        "the canary, then a fresh worker of the live release"
    );
    let ids = pool.generation_ids();
    let (canary, twin) = (ids[1], ids[2]);
    // The canary alone ready is not enough: the twin must be too.
    let a = pool.on(
        Event::Ready {
            generation: canary,
            index: 0,
        },
        t0,
    );
    assert!(
        !a.iter().any(|a| matches!(a, Action::CanaryLive { .. })),
        "{a:?}"
    );
    let a = pool.on(
        Event::Ready {
            generation: twin,
            index: 0,
        },
        t0,
    );
    assert!(
        a.iter()
            .any(|a| matches!(a, Action::CanaryLive { twin: Some(t), .. } if *t == twin)),
        "{a:?}"
    );
    // The twin's worker dies: nothing fair left to compare; reverted.
    let twin_pid = pid;
    let a = pool.on(
        Event::Exited {
            pid: twin_pid,
            how: Exit::Code(1),
            tail: String::new(),
        },
        t0 + MS,
    );
    assert!(
        matches!(outcome(&a), Some((_, Err(e))) if e.contains("inconclusive")),
        "{a:?}"
    );
    assert_eq!(
        signals(&a),
        vec![pid - 1],
        "the canary drains; the twin is gone"
    );
    assert_eq!(pool.live_pids(), vec![1, 2, 3, 4]);
}
