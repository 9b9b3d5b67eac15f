#!/usr/bin/env python3
"""Planted bugs: each mutates one production decision the simulators drive, runs the
simulator that must catch it (500 seeds unless seeds=N), prints the first failing seed, and
restores the file. Usage: server/cluster/planted_bugs.py [NAME ...] (default: all).
Not part of CI: it edits sources while it runs; run it from a clean tree."""
import os, subprocess, sys, re, shutil, tempfile
MUTS = {
 'early_drop': ('server/cluster/src/hand_off.rs', '&& replicas.iter().all(|replica| self.acknowledged.contains(replica))', '&& replicas.iter().any(|replica| self.acknowledged.contains(replica))', 'simulation::no_acknowledged'),
 'repair_older': ('server/cluster/src/coordinator.rs', 'self.stale_replicas().into_iter().map(|node| (node, self.merged.clone())).collect()', 'self.stale_replicas().into_iter().map(|node| (node, self.replies[&node].clone())).collect()', 'simulation::no_acknowledged'),
 'early_purge': ('server/cluster/src/merkle.rs', 'others.iter().all(|comparison| *comparison == Comparison::Equal)', 'others.iter().all(|comparison| *comparison != Comparison::Differing)', 'simulation::no_acknowledged'),
 'hint_counts': ('server/cluster/src/coordinator.rs', '''            Ack::Failed | Ack::Overloaded => {
                self.overloaded |= ack == Ack::Overloaded;
                self.round.on_error(from)''', '''            Ack::Failed | Ack::Overloaded => {
                self.overloaded |= ack == Ack::Overloaded;
                self.round.on_ack(from)''', 'simulation::no_acknowledged'),
 'no_completion': ('server/cluster/src/paxos.rs', 'let in_progress = highest_accepted.take().filter(|(b, _)| *b > *highest_committed);', 'let in_progress = highest_accepted.take().filter(|(b, _)| *b > *highest_committed && false);', 'serial_simulation'),
 'read_in_progress': ('server/cluster/src/paxos.rs', '''                Some(_) if reading => {
                    self.stage = Stage::Idle;
                    Step::Retry { attempt: 0 }
                }''', '''                Some(_) if reading => self.prepared(state),''', 'serial_simulation'),
 'clock_covers': ('server/cluster/src/paxos.rs', 'chosen.contains(&(own.ballot, own.dot))', 'state.context().covers(own.dot)', 'serial_simulation'),
 'fence': ('server/cluster/src/paxos.rs', '    proposer_ring != 0 && proposer_ring < acceptor_ring', '    let _ = (proposer_ring, acceptor_ring);\n    false', 'serial_simulation'),
 'barrier_all': ('server/cluster/src/ring_change.rs', '        if !behind.is_empty() {\n            return DriverStep::Barrier(behind);', '        if behind.is_empty() && behind.len() > 7 {\n            return DriverStep::Barrier(behind);', 'serial_simulation'),
 'barrier_completion': ('server/cluster/src/ring_change.rs', '        if !behind.is_empty() {\n            return DriverStep::Barrier(behind);', '        if !behind.is_empty() && self.done.iter().any(|d| !d) {\n            return DriverStep::Barrier(behind);', 'serial_simulation'),
 'live_subset': ('server/cluster/src/ring_state.rs', '        if others.iter().all(|&other| is_up(other)) {\n            others', '        if true {\n            others.into_iter().filter(|&other| is_up(other)).collect()', 'serial_simulation'),
}
ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..')) + '/'


def plant(name, path, old, new, test, seeds='500'):
    src = open(ROOT + path).read()
    assert old in src, (name, 'the code to mutate is not there any more')
    backup = tempfile.NamedTemporaryFile(delete=False).name
    shutil.copy(ROOT + path, backup)
    try:
        open(ROOT + path, 'w').write(src.replace(old, new, 1))
        env = dict(os.environ, SIM_SEEDS=seeds)
        out = subprocess.run(['cargo', 'test', '-p', 'cluster', '--lib', test], cwd=ROOT, env=env,
                             capture_output=True, text=True)
        m = re.search(r'seed (\d+)[^\n]{0,120}', out.stdout + out.stderr)
        verdict = m.group(0) if m else ('NOT CAUGHT' if out.returncode == 0 else 'failed: ' + out.stderr[-500:])
        print(f'{name}: {verdict}', flush=True)
    finally:
        shutil.copy(backup, ROOT + path)
        os.unlink(backup)


for name in sys.argv[1:] or list(MUTS):
    path, old, new, test = MUTS[name]
    plant(name, path, old, new, test)
