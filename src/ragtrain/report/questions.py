"""The report's per-question table and the small inline script that sorts and filters it.

The rows travel as JSON; the script draws them a page at a time, sorts and filters them, and
opens a cited passage's text (kept once per passage in a JSON block).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

from ragtrain.report import analysis as an


@dataclass(frozen=True)
class Assets:
    css: str
    js: str


_JS = r"""
(function(){
window.addEventListener('load',function(){
  document.body.dataset.loadMs=String(Math.round(performance.now()));});
function J(id){var e=document.getElementById(id);return e?JSON.parse(e.textContent):null;}
var t=document.getElementById('questions');if(!t)return;
var data=J('question-rows'),P=J('passages')||{},PAGE=100;
var cols=[].map.call(t.tHead.rows[0].cells,function(th){return th.dataset;});
var body=t.tBodies[0],q=document.getElementById('q-search');
var count=document.getElementById('q-count');
var more=document.getElementById('q-more'),all=document.getElementById('q-all');
var sels=[].slice.call(document.querySelectorAll('select.q-filter'));
var order=data.map(function(_,i){return i;}),shown=order,limit=PAGE,text=null;
function filter(){
  if(text===null)text=data.map(function(r){return (r[0]+' '+r[1]+' '+r[2]).toLowerCase();});
  var s=q.value.trim().toLowerCase();
  shown=order.filter(function(i){var r=data[i];return (!s||text[i].indexOf(s)>=0)&&
    sels.every(function(e){return !e.value||r[+e.dataset.col]===e.value;});});
  limit=PAGE;draw();}
function draw(){
  var f=document.createDocumentFragment();
  shown.slice(0,limit).forEach(function(i){
    var r=data[i],tr=document.createElement('tr');tr.dataset.o=r[5];
    r.forEach(function(v,c){var td=tr.insertCell(),d=cols[c];
      td.textContent=v===null?'—':('dec' in d?v.toFixed(+d.dec):String(v));
      td.className=('num' in d?'num ':'')+(d.cls||'');});
    f.appendChild(tr);});
  body.textContent='';body.appendChild(f);
  count.textContent=shown.length+' of '+data.length+' questions'+
    (shown.length>limit?' (the first '+limit+' shown)':'');
  more.hidden=all.hidden=shown.length<=limit;}
q.addEventListener('input',filter);
sels.forEach(function(e){e.addEventListener('change',filter);});
more.addEventListener('click',function(){limit+=PAGE*5;draw();});
all.addEventListener('click',function(){limit=shown.length;draw();});
t.tHead.addEventListener('click',function(e){
  var th=e.target.closest('th');if(!th)return;
  var c=th.cellIndex,num='num' in th.dataset,dir=th.dataset.dir==='asc'?-1:1;
  [].forEach.call(t.tHead.rows[0].cells,function(x){delete x.dataset.dir;});
  th.dataset.dir=dir>0?'asc':'desc';
  function key(i){var v=data[i][c];
    return num?(v===null?Infinity:v):String(v===null?'':v).toLowerCase();}
  var keyed=order.map(function(i){return [key(i),i];});
  keyed.sort(function(a,b){return a[0]<b[0]?-dir:a[0]>b[0]?dir:a[1]-b[1];});
  order=keyed.map(function(k){return k[1];});filter();});
body.addEventListener('click',function(e){
  var td=e.target.closest('td.cited');if(!td||td.textContent==='—')return;
  var tr=td.parentNode,next=tr.nextElementSibling;
  if(next&&next.classList.contains('passage')){next.remove();return;}
  var p=P[td.textContent],d=document.createElement('tr');d.className='passage';
  var cell=d.insertCell();cell.colSpan=tr.cells.length;
  cell.textContent=p?(p.title+': '+p.text):'(this passage is not in the report)';
  tr.parentNode.insertBefore(d,tr.nextSibling);});
filter();
})();
"""

_CSS = """
#questions{font-size:12px}#questions thead th{cursor:pointer;user-select:none}
#questions thead th[data-dir=asc]::after{content:' ▲'}
#questions thead th[data-dir=desc]::after{content:' ▼'}
#questions td.q{max-width:360px}
#questions td.cited{cursor:pointer;color:#1f55a0;text-decoration:underline dotted}
#questions tr.passage td{background:#fafae8;font-size:12px;max-width:1000px}
.controls{display:flex;gap:10px;align-items:center;margin:6px 0}.controls input{width:280px}
#questions tr[data-o=correct] td.outcome{color:#1a7f37}
#questions tr[data-o="retrieval miss"] td.outcome{color:#c62828}
#questions tr[data-o="reading miss"] td.outcome{color:#b26a00}
"""

ASSETS = Assets(_CSS, _JS)


def script_json(data: Any) -> str:
    """``data`` as JSON that is safe inside a <script> element (no "</script>", no "<!--")."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _select(key: int, label: str, values: Sequence[str]) -> str:
    opts = "".join(f'<option value="{escape(v)}">{escape(v)}</option>' for v in values)
    return (f'<label>{escape(label)} <select class="q-filter" data-col="{key}">'
            f'<option value="">all</option>{opts}</select></label>')


def question_table(rows: Sequence[Mapping[str, Any]], top_k: int) -> str:
    """The per-question table: its header, its rows as JSON (the script draws them a page at a
    time: thousands of table rows would take seconds to lay out), search box and filters."""
    if not rows:
        return '<p class="note">no per-question table found</p>'
    retrievers = [n for n in an.RETRIEVERS if any(n in r["ranks"] for r in rows)]
    num = ' data-num=""'
    head = ("<tr><th>question</th><th>gold answer</th><th>prediction</th>"
            f'<th{num}>EM</th><th{num} data-dec="2">F1</th><th data-cls="outcome">outcome</th>'
            f"<th>type</th><th>answer words</th><th{num} title=\"rank of the gold passage in the "
            f"list the generator read the top {top_k} of\">gold rank (read)</th>"
            + "".join(f'<th{num} title="rank of the gold passage under {n}">{n}</th>'
                      for n in retrievers)
            + '<th data-cls="cited" title="click a passage id for its text">cited passage</th>'
            "</tr>")
    data = [[r["question"], " | ".join(r["references"]), r["prediction"], round(r["em"]),
             round(r["f1"], 4), r["outcome"], r["type"], r["length"], r["read_rank"],
             *(r["ranks"].get(n) for n in retrievers), r["cited"]] for r in rows]
    controls = ('<div class="controls"><input id="q-search" type="search" '
                'placeholder="search questions, answers, predictions">'
                + _select(5, "outcome", an.OUTCOMES) + _select(6, "type", an.QUESTION_TYPES)
                + _select(7, "answer words", an.LENGTH_BUCKETS)
                + f'<span id="q-count">{len(rows)} questions</span></div>')
    return (controls + f'<table id="questions"><thead>{head}</thead><tbody></tbody></table>'
            '<noscript><p class="note">the question table needs JavaScript</p></noscript>'
            '<p><button id="q-more" hidden>show more</button> '
            '<button id="q-all" hidden>show all</button></p>'
            f'<script type="application/json" id="question-rows">{script_json(data)}</script>')
