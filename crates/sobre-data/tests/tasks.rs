//! Task generators: determinism, solvability, disjoint splits, demonstrations.

use std::collections::BTreeSet;

use sobre_data::tasks::arithmetic::{self, ArithmeticProblem};
use sobre_data::tasks::countdown::{self, CountdownProblem, reachable};
use sobre_data::tasks::{
    ArithmeticConfig, CountdownConfig, Problem, Split, TaskConfig, TaskError, TaskRng, generate,
};

fn small() -> CountdownConfig {
    sobre_data::shipped::demo_countdown()
}

#[test]
fn rng_range_is_uniform_in_bounds_and_seeded() {
    let mut a = TaskRng::new(7, Split::Train);
    let mut b = TaskRng::new(7, Split::Train);
    let mut c = TaskRng::new(7, Split::Eval);
    let xs: Vec<i64> = (0..1000).map(|_| a.range(1, 6)).collect();
    let ys: Vec<i64> = (0..1000).map(|_| b.range(1, 6)).collect();
    let zs: Vec<i64> = (0..1000).map(|_| c.range(1, 6)).collect();
    assert_eq!(xs, ys);
    assert_ne!(xs, zs);
    assert!(xs.iter().all(|x| (1..=6).contains(x)));
    for v in 1..=6 {
        let n = xs.iter().filter(|&&x| x == v).count();
        assert!(
            (120..=220).contains(&n),
            "value {v} drawn {n} times of 1000"
        );
    }
}

#[test]
fn countdown_is_deterministic_and_solvable() {
    let a = countdown::generate(&small(), Split::Train, 300, 42).unwrap();
    let b = countdown::generate(&small(), Split::Train, 300, 42).unwrap();
    assert_eq!(a, b);
    let c = countdown::generate(&small(), Split::Train, 300, 43).unwrap();
    assert_ne!(a, c);
    let mut keys = BTreeSet::new();
    for p in &a {
        assert_eq!(p.nums.len(), 3);
        assert!(p.nums.iter().all(|n| (1..=20).contains(n)));
        assert!((1..=99).contains(&p.target));
        let sol = p.solve().expect("every generated problem is solvable");
        assert_eq!(sol.steps.len(), 2);
        assert_eq!(sol.steps.last().unwrap().result, p.target);
        assert!(keys.insert(p.key()), "duplicate {}", p.key());
    }
}

#[test]
fn countdown_train_and_eval_never_share_a_problem() {
    let cfg = small();
    let train = countdown::generate(&cfg, Split::Train, 2000, 1).unwrap();
    let eval = countdown::generate(&cfg, Split::Eval, 500, 1).unwrap();
    let train_keys: BTreeSet<String> = train.iter().map(|p| p.key()).collect();
    assert!(eval.iter().all(|p| !train_keys.contains(&p.key())));
    assert!(eval.iter().all(|p| Split::of_key(&p.key()) == Split::Eval));
    assert!(
        train
            .iter()
            .all(|p| Split::of_key(&p.key()) == Split::Train)
    );
    // Shuffled numbers are the same problem.
    let p = CountdownProblem::new(vec![15, 3, 7], 11);
    let q = CountdownProblem::new(vec![7, 15, 3], 11);
    assert_eq!(p.key(), "countdown:3,7,15:11");
    assert_eq!(p.key(), q.key());
}

#[test]
fn countdown_solver_and_demonstration_format() {
    let p = CountdownProblem::new(vec![15, 3, 7], 11);
    let sol = p.solve().unwrap();
    assert_eq!(sol.reasoning(), "15 + 3 = 18, 18 - 7 = 11");
    assert_eq!(sol.expression, "(15 + 3) - 7");
    assert_eq!(
        sol.demonstration(),
        "<think>\n15 + 3 = 18, 18 - 7 = 11\n</think>\n<answer>\n(15 + 3) - 7\n</answer>"
    );
    // Subtraction and division take the larger operand first; four numbers nest.
    let p = CountdownProblem::new(vec![2, 8, 3, 5], 20);
    let sol = p.solve().unwrap();
    assert_eq!(sol.reasoning(), "2 + 8 = 10, 5 - 3 = 2, 10 * 2 = 20");
    assert_eq!(sol.expression, "(2 + 8) * (5 - 3)");
    assert_eq!(eval(&sol.expression), 20);
    let p = CountdownProblem::new(vec![3, 12], 4);
    assert_eq!(p.solve().unwrap().expression, "12 / 3");
    assert_eq!(CountdownProblem::new(vec![3, 5], 7).solve(), None);
    assert_eq!(reachable(&[3, 5]), BTreeSet::from([2, 8, 15]));
    assert_eq!(
        p.question(),
        "Using the numbers [3, 12], create an equation that equals 4. You can use basic arithmetic operations (+, -, *, /) and each number can only be used once. Show your work in <think> </think> tags. And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
    );
}

/// A tiny evaluator for the solver's fully parenthesised expressions.
fn eval(expr: &str) -> i64 {
    fn parse(t: &[&str], i: &mut usize) -> i64 {
        let mut v = atom(t, i);
        while *i < t.len() && t[*i] != ")" {
            let op = t[*i];
            *i += 1;
            let r = atom(t, i);
            v = match op {
                "+" => v + r,
                "-" => v - r,
                "*" => v * r,
                _ => v / r,
            };
        }
        v
    }
    fn atom(t: &[&str], i: &mut usize) -> i64 {
        if t[*i] == "(" {
            *i += 1;
            let v = parse(t, i);
            *i += 1;
            v
        } else {
            *i += 1;
            t[*i - 1].parse().unwrap()
        }
    }
    let spaced = expr.replace('(', "( ").replace(')', " )");
    let toks: Vec<&str> = spaced.split_whitespace().collect();
    parse(&toks, &mut 0)
}

#[test]
fn every_demo_expression_evaluates_to_its_target() {
    for p in countdown::generate(&CountdownConfig::default(), Split::Train, 200, 5).unwrap() {
        let sol = p.solve().unwrap();
        assert_eq!(
            eval(&sol.expression),
            p.target,
            "{:?} -> {}",
            p,
            sol.expression
        );
        let mut used: Vec<i64> = sol
            .expression
            .replace(['(', ')'], " ")
            .split_whitespace()
            .filter_map(|t| t.parse().ok())
            .collect();
        let mut nums = p.nums.clone();
        used.sort_unstable();
        nums.sort_unstable();
        assert_eq!(used, nums, "each number used exactly once");
    }
}

#[test]
fn first_countdown_problems_are_pinned() {
    // Pinned so any change to the random stream or the draw order is noticed: the shipped
    // datasets' checksums depend on them.
    let s = generate(&TaskConfig::Countdown(small()), Split::Train, 3, 1, true).unwrap();
    let got: Vec<String> = s.iter().map(|s| s.to_json_line()).collect();
    insta_like(&got, include_str!("fixtures/countdown_first3.txt"));
}

fn insta_like(got: &[String], expected: &str) {
    let joined = got.join("\n") + "\n";
    if std::env::var_os("SOBRE_BLESS").is_some() {
        std::fs::write(
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/countdown_first3.txt"
            ),
            &joined,
        )
        .unwrap();
        return;
    }
    assert_eq!(joined, expected);
}

#[test]
fn arithmetic_reasoning_by_place_value() {
    let p = ArithmeticProblem {
        a: 123,
        op: '+',
        b: 45,
    };
    assert_eq!(p.reasoning(), "123 + 40 = 163, 163 + 5 = 168");
    let p = ArithmeticProblem {
        a: 123,
        op: '-',
        b: 45,
    };
    assert_eq!(p.reasoning(), "123 - 40 = 83, 83 - 5 = 78");
    let p = ArithmeticProblem {
        a: 123,
        op: '*',
        b: 45,
    };
    assert_eq!(
        p.reasoning(),
        "123 * 40 = 4920, 123 * 5 = 615, 4920 + 615 = 5535"
    );
    let p = ArithmeticProblem {
        a: 7,
        op: '*',
        b: 0,
    };
    assert_eq!(p.reasoning(), "7 * 0 = 0");
    let p = ArithmeticProblem {
        a: 12,
        op: '*',
        b: 305,
    };
    assert_eq!(
        p.reasoning(),
        "12 * 300 = 3600, 12 * 5 = 60, 3600 + 60 = 3660"
    );
    let s = p.to_sample(true);
    assert_eq!(s.answer.as_deref(), Some("3660"));
    assert_eq!(
        s.completion.as_deref(),
        Some(
            "<think>\n12 * 300 = 3600, 12 * 5 = 60, 3600 + 60 = 3660\n</think>\n<answer>\n3660\n</answer>"
        )
    );
    assert_eq!(
        ArithmeticProblem {
            a: 9,
            op: '+',
            b: 3
        }
        .key(),
        "arithmetic:3 + 9"
    );
    assert_eq!(
        ArithmeticProblem {
            a: 9,
            op: '-',
            b: 3
        }
        .key(),
        "arithmetic:9 - 3"
    );
}

#[test]
fn arithmetic_splits_digits_and_options() {
    let cfg = ArithmeticConfig {
        min_digits: 2,
        max_digits: 2,
        ops: vec!['-'],
        allow_negative: false,
    };
    let train = arithmetic::generate(&cfg, Split::Train, 500, 3).unwrap();
    let eval = arithmetic::generate(&cfg, Split::Eval, 100, 3).unwrap();
    let keys: BTreeSet<String> = train.iter().map(|p| p.key()).collect();
    assert!(eval.iter().all(|p| !keys.contains(&p.key())));
    for p in &train {
        assert!((10..=99).contains(&p.a) && (10..=99).contains(&p.b));
        assert!(p.a >= p.b && p.op == '-');
    }
    let bad = ArithmeticConfig {
        ops: vec!['/'],
        ..Default::default()
    };
    assert_eq!(
        arithmetic::generate(&bad, Split::Train, 1, 0)
            .unwrap_err()
            .to_string(),
        "invalid arithmetic option: operator `/` is not one of +, -, *"
    );
}

#[test]
fn tiny_problem_space_is_an_error_not_a_hang() {
    let cfg = CountdownConfig {
        min_count: 2,
        max_count: 2,
        min_number: 1,
        max_number: 2,
        min_target: 1,
        max_target: 99,
        ..CountdownConfig::default()
    };
    let err = countdown::generate(&cfg, Split::Train, 50, 0).unwrap_err();
    assert!(
        matches!(err, TaskError::Exhausted { wanted: 50, .. }),
        "{err}"
    );
}

#[test]
fn short_question_style_names_the_numbers_and_target_only() {
    use sobre_data::tasks::countdown::QuestionStyle;
    let mut p = CountdownProblem::new(vec![15, 3, 7], 11);
    assert!(
        p.question()
            .starts_with("Using the numbers [15, 3, 7], create an equation that equals 11.")
    );
    p.style = QuestionStyle::Short;
    assert_eq!(p.question(), "Using the numbers [15, 3, 7], make 11.");
    // From TOML, as a config writes it; the problems drawn do not depend on the wording.
    let cfg: CountdownConfig = toml::from_str("max_count = 3\nquestion = \"short\"").unwrap();
    assert_eq!(cfg.question, QuestionStyle::Short);
    let short = countdown::generate(&cfg, Split::Train, 20, 3).unwrap();
    let plain = countdown::generate(
        &CountdownConfig {
            question: QuestionStyle::TinyZero,
            ..cfg.clone()
        },
        Split::Train,
        20,
        3,
    )
    .unwrap();
    for (s, t) in short.iter().zip(&plain) {
        assert_eq!((&s.nums, s.target), (&t.nums, t.target));
        assert_eq!(
            s.question(),
            format!(
                "Using the numbers [{}], make {}.",
                s.nums
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                s.target
            )
        );
    }
    assert!(toml::from_str::<CountdownConfig>("question = \"long\"").is_err());
}

/// Checks one line of a search trace: `a op b = r, …` with correct arithmetic (positive
/// integers, exact division), every number of the problem used exactly once across the line
/// (each intermediate result consumed by a later step). Returns the line's final value.
fn check_trace_line(line: &str, nums: &[i64]) -> i64 {
    let mut pool: Vec<i64> = nums.to_vec();
    let mut last = 0;
    for step in line.split(", ") {
        let t: Vec<&str> = step.split(' ').collect();
        assert_eq!(t.len(), 5, "step `{step}` of `{line}`");
        assert_eq!(t[3], "=", "step `{step}`");
        let (a, b, r): (i64, i64, i64) = (
            t[0].parse().unwrap(),
            t[2].parse().unwrap(),
            t[4].parse().unwrap(),
        );
        let want = match t[1] {
            "+" => a + b,
            "-" => a - b,
            "*" => a * b,
            "/" => {
                assert_eq!(a % b, 0, "inexact division in `{line}`");
                a / b
            }
            op => panic!("operator {op} in `{line}`"),
        };
        assert_eq!(r, want, "arithmetic of `{step}` in `{line}`");
        assert!(r > 0, "non-positive intermediate in `{line}`");
        for operand in [a, b] {
            let k = pool
                .iter()
                .position(|&x| x == operand)
                .unwrap_or_else(|| panic!("`{line}` uses {operand}, not available from {nums:?}"));
            pool.remove(k);
        }
        pool.push(r);
        last = r;
    }
    assert_eq!(
        pool,
        vec![last],
        "`{line}` must use every number of {nums:?} once"
    );
    last
}

#[test]
fn search_demonstrations_are_correct_misses_then_the_solution() {
    use sobre_data::tasks::countdown::DemoStyle;
    let cfg: CountdownConfig = toml::from_str(
        "min_count = 3\nmax_count = 4\nmax_number = 20\nmax_target = 50\ndemo = \"search\"\nmax_misses = 2",
    )
    .unwrap();
    assert_eq!((cfg.demo, cfg.max_misses), (DemoStyle::Search, 2));
    let problems = countdown::generate(&cfg, Split::Train, 400, 9).unwrap();
    let mut misses_seen = [0usize; 3];
    for p in &problems {
        let demo = p.demonstration().unwrap();
        let sol = p.solve().unwrap();
        // The answer part is the solver's, exactly as in a solution-style demonstration.
        assert!(
            demo.ends_with(&format!(
                "\n</think>\n<answer>\n{}\n</answer>",
                sol.expression
            )),
            "{demo}"
        );
        let think = demo
            .strip_prefix("<think>\n")
            .and_then(|d| d.split("\n</think>").next())
            .unwrap();
        let lines: Vec<&str> = think.lines().collect();
        let (last, missed) = lines.split_last().unwrap();
        assert_eq!(
            *last,
            sol.reasoning(),
            "the trace ends on the solver's path"
        );
        assert!(missed.len() <= 2, "{demo}");
        misses_seen[missed.len()] += 1;
        for (i, line) in missed.iter().enumerate() {
            assert_ne!(
                check_trace_line(line, &p.nums),
                p.target,
                "a miss hit: {demo}"
            );
            assert_ne!(*line, *last);
            assert!(!missed[..i].contains(line), "repeated miss: {demo}");
        }
        assert_eq!(check_trace_line(last, &p.nums), p.target);
        // The trace depends on the problem alone: the same problem drawn from another config
        // object, or built by hand, writes the same bytes.
        let again = CountdownProblem {
            nums: p.nums.clone(),
            target: p.target,
            style: p.style,
            demo: DemoStyle::Search,
            max_misses: 2,
            calculator: false,
        };
        assert_eq!(again.demonstration().unwrap(), demo);
    }
    // 0, 1 and 2 misses are drawn uniformly (400 problems: ~133 each; a few problems have
    // fewer distinct misses than drawn).
    for (k, &n) in misses_seen.iter().enumerate() {
        assert!(
            (95..=175).contains(&n),
            "{n} problems with {k} misses: {misses_seen:?}"
        );
    }
    // The problems themselves do not depend on the demonstration style.
    let plain = countdown::generate(
        &CountdownConfig {
            demo: DemoStyle::Solution,
            ..cfg.clone()
        },
        Split::Train,
        400,
        9,
    )
    .unwrap();
    for (s, t) in problems.iter().zip(&plain) {
        assert_eq!((&s.nums, s.target), (&t.nums, t.target));
        assert_eq!(
            t.demonstration().unwrap(),
            t.solve().unwrap().demonstration()
        );
    }
    // A pinned trace, so a change to the miss draw is noticed.
    let p = CountdownProblem {
        demo: DemoStyle::Search,
        max_misses: 2,
        ..CountdownProblem::new(vec![2, 5, 10], 13)
    };
    assert_eq!(
        p.demonstration().unwrap(),
        "<think>\n10 + 2 = 12, 12 - 5 = 7\n10 / 2 = 5, 5 * 5 = 25\n5 - 2 = 3, 10 + 3 = 13\n</think>\n<answer>\n10 + (5 - 2)\n</answer>"
    );
    // max_misses = 0 is the solution style.
    let p0 = CountdownProblem { max_misses: 0, ..p };
    assert_eq!(
        p0.demonstration().unwrap(),
        p0.solve().unwrap().demonstration()
    );
    let err = countdown::generate(
        &CountdownConfig {
            max_misses: 9,
            ..cfg
        },
        Split::Train,
        1,
        0,
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid countdown option: max_misses = 9 is more than 8; every miss costs a line of completion"
    );
    assert!(toml::from_str::<CountdownConfig>("demo = \"trace\"").is_err());
}

/// With `calculator = true` every step is an inline calculator call followed by the result the
/// tool would insert: the same steps as the plain form, in the tool's markers.
#[test]
fn calculator_demonstrations_write_each_step_as_a_tool_call() {
    let p = CountdownProblem {
        calculator: true,
        ..CountdownProblem::new(vec![15, 3, 7], 11)
    };
    assert_eq!(
        p.demonstration().unwrap(),
        "<think>\n<calc>15 + 3</calc><result>18</result>, <calc>18 - 7</calc><result>11</result>\n</think>\n<answer>\n(15 + 3) - 7\n</answer>"
    );
    let p = CountdownProblem {
        demo: sobre_data::tasks::countdown::DemoStyle::Search,
        max_misses: 2,
        calculator: true,
        ..CountdownProblem::new(vec![2, 5, 10], 13)
    };
    assert_eq!(
        p.demonstration().unwrap(),
        "<think>\n<calc>10 + 2</calc><result>12</result>, <calc>12 - 5</calc><result>7</result>\n<calc>10 / 2</calc><result>5</result>, <calc>5 * 5</calc><result>25</result>\n<calc>5 - 2</calc><result>3</result>, <calc>10 + 3</calc><result>13</result>\n</think>\n<answer>\n10 + (5 - 2)\n</answer>"
    );
}
