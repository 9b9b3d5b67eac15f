#!/usr/bin/env python3
"""Fails when the server's modules import each other in a cycle (issue 17): every module's
`crate::` and `super::` references (test modules left out) form a graph whose strongly
connected components must all be single modules. A module's own submodules (`mod x;`, a
type's impl split across files) are part of it: only `crate::` and `super::` paths count.
Prints each cycle found."""
import re, os, collections, sys
os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'server', 'src'))
edges=collections.defaultdict(set)
files=[]
for root,_,fs in os.walk('.'):
    for f in fs:
        if f.endswith('.rs'): files.append(os.path.join(root,f)[2:])
def modname(path):
    p=path[:-3]
    if p.endswith('/mod'): p=p[:-4]
    return p.replace('/','::')
for f in files:
    m=modname(f)
    s=open(f).read()
    i=s.find('#[cfg(test)]\nmod tests')
    if i>=0: s=s[:i]
    for t in re.findall(r'(?<![:\w])crate::([a-z_]+(?:::[a-z_]+)?)', s):
        edges[m].add(t)
    parent='::'.join(m.split('::')[:-1])
    for t in re.findall(r'super::([a-z_]+)', s):
        edges[m].add((parent+'::' if parent else '')+t)
mods=set(modname(f) for f in files)
def norm(t):
    parts=t.split('::')
    for k in range(len(parts),0,-1):
        c='::'.join(parts[:k])
        if c in mods: return c
    return None
g={m:set(filter(None,(norm(t) for t in edges[m])))-{m} for m in mods}
index={};low={};st=[];on=set();res=[];c=[0]
sys.setrecursionlimit(10000)
def sc(v):
    index[v]=low[v]=c[0];c[0]+=1;st.append(v);on.add(v)
    for w in g[v]:
        if w not in index: sc(w);low[v]=min(low[v],low[w])
        elif w in on: low[v]=min(low[v],index[w])
    if low[v]==index[v]:
        comp=[]
        while True:
            w=st.pop();on.discard(w);comp.append(w)
            if w==v:break
        res.append(comp)
for v in sorted(mods):
    if v not in index: sc(v)
cycles = [comp for comp in res if len(comp) > 1]
for comp in cycles:
    print(f'an import cycle of {len(comp)} modules:', ', '.join(sorted(comp)))
    for a in sorted(comp):
        print('  ', a, '->', ', '.join(sorted(g[a] & set(comp))))
if cycles:
    sys.exit(1)
print(f'no import cycle among the server\'s {len(mods)} modules')
