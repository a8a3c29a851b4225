"""The embedding scatter: one self-contained interactive HTML page (a canvas, no library, opens from disk) and a
static PNG of the same plot.

The page draws every point on a 2-D canvas, grouped by colour (one ``fillStyle`` per colour, not per point),
so 100,000 points draw in one frame; hover looks the nearest point up in a grid of screen cells built once
per view. Colour by true class, prediction, correct / wrong, or the audit's SpRAy cluster; misclassified
points carry a dark ring. Thumbnails are tiled into several JPEG atlases of ``ATLAS_TILES`` x ``ATLAS_TILES``
tiles (not one sprite sheet: TensorBoard's projector caps its single sprite at 8192 x 8192 pixels); each atlas
stays a base64 string until a point on it is first hovered, then becomes an image. Click opens the image with
its explanation map (the predicted class's map, coloured with jet over the thumbnail, drawn by the page).

The point data travels as base64 typed arrays (float32 coordinates, int32 classes), not as JSON objects, so
100,000 points cost about 2 MB and decode in milliseconds. A renderer never runs a model: everything here
comes from :class:`ScatterData` (what :func:`cnnscope.audit.embedding.scatter_data` reads from a store).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

#: Side of a thumbnail tile in the atlases, and tiles per atlas row (an atlas is 2048 x 2048 pixels).
TILE = 64
ATLAS_TILES = 32

#: Colours for up to 20 classes (the tab20 order, strong ones first); more classes get evenly spaced hues.
PALETTE = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#aec7e8",
    "#ffbb78",
    "#98df8a",
    "#ff9896",
    "#c5b0d5",
    "#c49c94",
    "#f7b6d2",
    "#c7c7c7",
    "#dbdb8d",
    "#9edae5",
]


@dataclass
class ScatterData:
    """What the scatter shows. Per point (N): ``points`` (N, 2), ``labels``, ``predicted``, ``names`` (file
    names), ``top3`` and ``top3_probability`` (N, <=3), ``cluster`` (N,) or None. ``thumbnail_rows``: the
    points with a picture, with their ``thumbnails`` (JPEG bytes or None) and ``maps`` (M, s, s, the
    predicted class's map, sign and scale kept). ``class_names`` indexed by class."""

    points: np.ndarray
    labels: np.ndarray
    predicted: np.ndarray
    class_names: list[str]
    names: list[str]
    top3: np.ndarray
    top3_probability: np.ndarray
    cluster: np.ndarray | None = None
    thumbnail_rows: np.ndarray | None = None
    thumbnails: list[bytes | None] | None = None
    maps: np.ndarray | None = None
    title: str = "embedding"


def colours(count: int) -> list[str]:
    """``count`` distinct colours (hex)."""
    if count <= len(PALETTE):
        return list(PALETTE[:count])
    import colorsys

    out = []
    for i in range(count):
        r, g, b = colorsys.hls_to_rgb(i / count, 0.5 if i % 2 == 0 else 0.38, 0.75)
        out.append(f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}")
    return out


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def atlases(
    thumbnails: list[bytes | None], tile: int = TILE, per_row: int = ATLAS_TILES
) -> tuple[list[str], np.ndarray]:
    """The thumbnails tiled into JPEG atlases (``per_row`` x ``per_row`` tiles of ``tile`` pixels, each picture
    scaled to fit and centred in its tile), as data URIs, and each picture's (width, height) in its tile;
    thumbnail ``i`` is tile ``i % per_row**2`` of atlas ``i // per_row**2``."""
    per_atlas = per_row * per_row
    uris = []
    sizes = np.zeros((len(thumbnails), 2), np.uint8)
    for first in range(0, len(thumbnails), per_atlas):
        chunk = thumbnails[first : first + per_atlas]
        rows = (len(chunk) + per_row - 1) // per_row
        sheet = Image.new("RGB", (per_row * tile, rows * tile), (238, 238, 238))
        for i, picture in enumerate(chunk):
            if not picture:
                continue
            with Image.open(io.BytesIO(picture)) as opened:
                small = opened.convert("RGB")
                scale = tile / max(small.width, small.height)
                width, height = max(1, round(small.width * scale)), max(1, round(small.height * scale))
                small = small.resize((width, height), Image.Resampling.BILINEAR)
                sizes[first + i] = (width, height)
                x = (i % per_row) * tile + (tile - small.width) // 2
                y = (i // per_row) * tile + (tile - small.height) // 2
                sheet.paste(small, (x, y))
        buffer = io.BytesIO()
        sheet.save(buffer, format="JPEG", quality=82)
        uris.append("data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"))
    return uris, sizes


def _quantized_maps(maps: np.ndarray) -> np.ndarray:
    """Maps -> uint8 (positive part scaled to each map's maximum; an all-negative map stays 0)."""
    positive = np.clip(np.asarray(maps, dtype=np.float32), 0, None)
    top = positive.reshape(len(positive), -1).max(axis=1) if len(positive) else np.zeros(0)
    scaled = positive / np.where(top > 0, top, 1.0)[:, None, None]
    return np.round(scaled * 255).astype(np.uint8)


def payload(data: ScatterData, sizes: np.ndarray | None = None) -> dict:
    """The JSON the page reads (typed arrays as base64); ``sizes``: each thumbnail's (width, height) in its tile."""
    count = len(data.points)
    points = np.asarray(data.points, dtype=np.float32).reshape(count, 2)
    if count:
        low, high = points.min(axis=0), points.max(axis=0)
        points = (points - low) / np.where(high > low, high - low, 1.0)
    top3 = np.full((count, 3), -1, np.int32)
    top3_p = np.zeros((count, 3), np.float32)
    depth = min(3, np.asarray(data.top3).shape[1] if count else 0)
    if depth:
        top3[:, :depth] = np.asarray(data.top3)[:, :depth]
        top3_p[:, :depth] = np.asarray(data.top3_probability)[:, :depth]
    thumb = np.full(count, -1, np.int32)
    rows = np.asarray(data.thumbnail_rows if data.thumbnail_rows is not None else [], dtype=np.int64)
    thumb[rows] = np.arange(len(rows), dtype=np.int32)
    maps = data.maps if data.maps is not None and len(rows) else np.zeros((0, 1, 1), np.float32)
    map_side = int(maps.shape[-1]) if len(maps) else 0
    cluster = np.asarray(data.cluster, dtype=np.int32) if data.cluster is not None else None
    return {
        "title": data.title,
        "count": count,
        "classes": list(data.class_names),
        "colours": colours(len(data.class_names)),
        "xy": _b64(points),
        "label": _b64(np.asarray(data.labels, dtype=np.int32)),
        "predicted": _b64(np.asarray(data.predicted, dtype=np.int32)),
        "cluster": _b64(cluster) if cluster is not None else None,
        "clusters": int(cluster.max()) + 1 if cluster is not None and count else 0,
        "top3": _b64(top3),
        "top3p": _b64(top3_p),
        "thumb": _b64(thumb),
        "names": list(data.names),
        "tile": TILE,
        "perRow": ATLAS_TILES,
        "mapSide": map_side,
        "maps": _b64(_quantized_maps(maps)) if map_side else "",
        "sizes": _b64(np.asarray(sizes if sizes is not None else np.zeros((0, 2)), dtype=np.uint8)),
    }


_STYLE = """
*{box-sizing:border-box} body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222;
background:#fafafa} header{display:flex;gap:14px;align-items:center;padding:8px 12px;flex-wrap:wrap;font-size:13px}
header h1{font-size:15px;margin:0 8px 0 0} #wrap{position:relative;width:100%;height:calc(100vh - 48px);min-height:360px}
#plot{width:100%;height:100%;display:block;background:#fff;cursor:crosshair}
#tip{position:absolute;pointer-events:none;background:#fff;border:1px solid #bbb;border-radius:6px;padding:6px;
font-size:12px;box-shadow:0 2px 8px #0002;display:none;max-width:260px} #tip canvas{display:block;margin-bottom:4px}
#detail{position:absolute;right:10px;top:10px;background:#fff;border:1px solid #bbb;border-radius:8px;padding:10px;
display:none;font-size:12px;box-shadow:0 2px 12px #0003;max-width:300px} #detail canvas{display:block}
#detail button{float:right} #legend{display:flex;gap:8px;flex-wrap:wrap;max-width:60vw}
#legend span{display:inline-flex;align-items:center;gap:3px} #legend i{width:10px;height:10px;border-radius:5px;
display:inline-block} .wrong{color:#b00020}
"""  # noqa: E501

_SCRIPT = r"""
(function(){
const D=JSON.parse(document.getElementById('scatter-data').textContent);
function bytes(s){const b=atob(s),a=new Uint8Array(b.length);for(let i=0;i<b.length;i++)a[i]=b.charCodeAt(i);return a;}
const N=D.count, xy=new Float32Array(bytes(D.xy).buffer), label=new Int32Array(bytes(D.label).buffer),
 pred=new Int32Array(bytes(D.predicted).buffer), top3=new Int32Array(bytes(D.top3).buffer),
 top3p=new Float32Array(bytes(D.top3p).buffer), thumb=new Int32Array(bytes(D.thumb).buffer),
 cluster=D.cluster?new Int32Array(bytes(D.cluster).buffer):null, maps=D.mapSide?bytes(D.maps):null, sizes=bytes(D.sizes);
const ATL=JSON.parse(document.getElementById('scatter-atlases').textContent);
const atlasImages=new Array(ATL.length).fill(null);
function atlas(i){ if(!atlasImages[i]){const im=new Image();im.onload=()=>{if(hover>=0)showTip(hover,lastX,lastY);};
  im.src=ATL[i];atlasImages[i]=im;document.body.dataset.atlasesLoaded=atlasImages.filter(Boolean).length;} return atlasImages[i]; }
const canvas=document.getElementById('plot'), ctx=canvas.getContext('2d'), tip=document.getElementById('tip'),
 detail=document.getElementById('detail'), mode=document.getElementById('colour'), legend=document.getElementById('legend');
let view={x:0,y:0,k:1}, hover=-1, lastX=0, lastY=0, grid=null, px=null, py=null;
const PAD=14, CELL=8;
function colourOf(i){ const m=mode.value;
  if(m==='correct') return label[i]===pred[i]?0:1;
  if(m==='predicted') return pred[i]; if(m==='cluster'&&cluster) return cluster[i]; return label[i]; }
function palette(){ const m=mode.value;
  if(m==='correct') return [['right','#2e7d32'],['wrong','#d62728']];
  if(m==='cluster') return Array.from({length:Math.max(1,D.clusters)},(_,j)=>[j===0?'main strategy':'other strategy '+j,
    j===0?'#9e9e9e':D.colours.length?['#d62728','#1f77b4','#ff7f0e','#9467bd','#2ca02c','#8c564b'][(j-1)%6]:'#000']);
  return D.classes.map((n,j)=>[n,D.colours[j]]); }
function resize(){ const r=canvas.getBoundingClientRect(), s=window.devicePixelRatio||1;
  canvas.width=Math.max(1,Math.round(r.width*s)); canvas.height=Math.max(1,Math.round(r.height*s));
  ctx.setTransform(s,0,0,s,0,0); draw(); }
function draw(){ const r=canvas.getBoundingClientRect(), w=r.width, h=r.height, side=Math.min(w,h)-2*PAD;
  const ox=(w-side)/2, oy=(h-side)/2; px=new Float32Array(N); py=new Float32Array(N);
  ctx.clearRect(0,0,w,h); const pal=palette(), groups=pal.map(()=>[]);
  for(let i=0;i<N;i++){ px[i]=ox+(xy[2*i]*side-view.x)*view.k; py[i]=oy+((1-xy[2*i+1])*side-view.y)*view.k;
    const c=colourOf(i); (groups[c]||(groups[c]=[])).push(i); }
  const size=N>20000?2:(N>2000?3:5), half=size/2; let drawn=0;
  for(let c=0;c<groups.length;c++){ const g=groups[c]; if(!g||!g.length) continue; ctx.fillStyle=pal[c]?pal[c][1]:'#000';
    for(const i of g){ if(px[i]<-5||py[i]<-5||px[i]>w+5||py[i]>h+5) continue; ctx.fillRect(px[i]-half,py[i]-half,size,size); drawn++; } }
  ctx.strokeStyle='#000'; ctx.lineWidth=1; ctx.beginPath(); let wrong=0;
  for(let i=0;i<N;i++){ if(label[i]!==pred[i]){ wrong++; if(px[i]<-5||py[i]<-5||px[i]>w+5||py[i]>h+5) continue;
    ctx.moveTo(px[i]+half+1.5,py[i]); ctx.arc(px[i],py[i],half+1.5,0,2*Math.PI); } }
  ctx.stroke(); buildGrid(w,h);
  canvas.dataset.drawn=drawn; canvas.dataset.wrong=wrong; canvas.dataset.draws=(+(canvas.dataset.draws||0))+1;
  legend.innerHTML=pal.map(([n,c])=>`<span><i style="background:${c}"></i>${esc(n)}</span>`).join(''); }
function buildGrid(w,h){ const cols=Math.ceil(w/CELL)+1, rows=Math.ceil(h/CELL)+1, heads=new Int32Array(cols*rows).fill(-1),
  next=new Int32Array(N).fill(-1);
  for(let i=0;i<N;i++){ const cx=Math.floor(px[i]/CELL), cy=Math.floor(py[i]/CELL); if(cx<0||cy<0||cx>=cols||cy>=rows) continue;
    const k=cy*cols+cx; next[i]=heads[k]; heads[k]=i; }
  grid={cols,rows,heads,next}; }
function nearest(x,y){ if(!grid) return -1; let best=-1, bd=100; const cx=Math.floor(x/CELL), cy=Math.floor(y/CELL);
  for(let dy=-1;dy<=1;dy++) for(let dx=-1;dx<=1;dx++){ const gx=cx+dx, gy=cy+dy;
    if(gx<0||gy<0||gx>=grid.cols||gy>=grid.rows) continue;
    for(let i=grid.heads[gy*grid.cols+gx];i>=0;i=grid.next[i]){ const d=(px[i]-x)**2+(py[i]-y)**2; if(d<bd){bd=d;best=i;} } }
  return best; }
function esc(s){ return String(s).replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c])); }
function drawThumb(i,target,side,withMap){ const t=thumb[i]; const c=target.getContext('2d'); target.width=target.height=side;
  c.fillStyle='#eee'; c.fillRect(0,0,side,side); if(t<0) return false;
  const per=D.perRow*D.perRow, a=atlas(Math.floor(t/per)), k=t%per, sx=(k%D.perRow)*D.tile, sy=Math.floor(k/D.perRow)*D.tile;
  if(!a.complete||!a.naturalWidth) return false;
  const tw=sizes[2*t]||D.tile, th=sizes[2*t+1]||D.tile, f=side/D.tile, rx=(side-tw*f)/2, ry=(side-th*f)/2;
  c.imageSmoothingEnabled=true; c.drawImage(a,sx+(D.tile-tw>>1),sy+(D.tile-th>>1),tw,th,rx,ry,tw*f,th*f);
  if(withMap&&maps){ const s=D.mapSide, m=document.createElement('canvas'); m.width=m.height=s; const mc=m.getContext('2d'),
    im=mc.createImageData(s,s);
    for(let j=0;j<s*s;j++){ const v=maps[t*s*s+j]/255, o=4*j; const r=Math.min(1,Math.max(0,1.5-Math.abs(4*v-3))),
      g=Math.min(1,Math.max(0,1.5-Math.abs(4*v-2))), b=Math.min(1,Math.max(0,1.5-Math.abs(4*v-1)));
      im.data[o]=255*r; im.data[o+1]=255*g; im.data[o+2]=255*b; im.data[o+3]=255*(0.15+0.45*v); }
    mc.putImageData(im,0,0); c.drawImage(m,rx,ry,tw*f,th*f); }
  return true; }
function describe(i){ const rows=[]; for(let j=0;j<3;j++){ const c=top3[3*i+j]; if(c<0) continue;
    rows.push(`${esc(D.classes[c]??c)} ${(100*top3p[3*i+j]).toFixed(1)}%`); }
  const wrong=label[i]!==pred[i];
  return `<b>${esc(D.names[i]??i)}</b><br>true: ${esc(D.classes[label[i]]??label[i])}`+
    `<br><span class="${wrong?'wrong':''}">predicted: ${esc(D.classes[pred[i]]??pred[i])}${wrong?' ✗':''}</span>`+
    (cluster?`<br>cluster ${cluster[i]}`:'')+`<ol class="top3" style="margin:3px 0 0 16px;padding:0">`+
    rows.map(r=>`<li>${r}</li>`).join('')+'</ol>'; }
function showTip(i,x,y){ tip.innerHTML=''; const c=document.createElement('canvas'); const ok=drawThumb(i,c,96,false);
  c.className='thumb'; c.dataset.loaded=ok?'1':'0'; if(thumb[i]>=0) tip.appendChild(c);
  const t=document.createElement('div'); t.innerHTML=describe(i); tip.appendChild(t); tip.style.display='block';
  const r=canvas.getBoundingClientRect(); tip.style.left=Math.min(x+14,r.width-270)+'px'; tip.style.top=Math.min(y+14,r.height-230)+'px';
  tip.dataset.point=i; }
canvas.addEventListener('mousemove',e=>{ const r=canvas.getBoundingClientRect(); lastX=e.clientX-r.left; lastY=e.clientY-r.top;
  if(drag){ view.x-=(lastX-drag.x)/view.k; view.y-=(lastY-drag.y)/view.k; drag={x:lastX,y:lastY}; moved=true; draw(); return; }
  const i=nearest(lastX,lastY); hover=i; if(i<0){ tip.style.display='none'; return; } showTip(i,lastX,lastY); });
canvas.addEventListener('mouseleave',()=>{ tip.style.display='none'; hover=-1; drag=null; });
let drag=null, moved=false;
canvas.addEventListener('mousedown',e=>{ const r=canvas.getBoundingClientRect(); drag={x:e.clientX-r.left,y:e.clientY-r.top}; moved=false; });
canvas.addEventListener('mouseup',e=>{ const wasDrag=moved; drag=null; if(wasDrag) return; const r=canvas.getBoundingClientRect();
  const i=nearest(e.clientX-r.left,e.clientY-r.top); if(i>=0) openDetail(i); });
canvas.addEventListener('wheel',e=>{ e.preventDefault(); const r=canvas.getBoundingClientRect(), x=e.clientX-r.left, y=e.clientY-r.top,
  f=e.deltaY<0?1.25:0.8, k=Math.min(200,Math.max(1,view.k*f)); const side=Math.min(r.width,r.height)-2*PAD,
  ox=(r.width-side)/2, oy=(r.height-side)/2; const wx=(x-ox)/view.k+view.x, wy=(y-oy)/view.k+view.y;
  view.k=k; view.x=wx-(x-ox)/k; view.y=wy-(y-oy)/k; draw(); },{passive:false});
function openDetail(i){ const body=document.getElementById('detail-body'); body.innerHTML='';
  const c=document.createElement('canvas'); c.id='detail-image';
  const paint=()=>{ const ok=drawThumb(i,c,256,true); c.dataset.loaded=ok?'1':'0'; if(!ok&&thumb[i]>=0) setTimeout(paint,30); };
  if(thumb[i]>=0){ body.appendChild(c); paint(); } else { body.insertAdjacentHTML('beforeend','<p>no thumbnail kept for this point</p>'); }
  body.insertAdjacentHTML('beforeend',describe(i)+(thumb[i]>=0&&maps?'<small>map of the predicted class</small>':''));
  detail.style.display='block'; detail.dataset.point=i; }
document.getElementById('close').addEventListener('click',()=>{ detail.style.display='none'; });
mode.addEventListener('change',draw); window.addEventListener('resize',resize);
if(!cluster) mode.querySelector('option[value=cluster]').disabled=true;
document.getElementById('reset').addEventListener('click',()=>{ view={x:0,y:0,k:1}; draw(); });
window.cnnscopeScatter={screen:i=>[px[i],py[i]], count:N, draw};
resize(); document.body.dataset.ready='true';
})();
"""  # noqa: E501


def scatter_html(data: ScatterData) -> str:
    """The whole page (self-contained)."""
    thumbnails = data.thumbnails or []
    sheets, sizes = atlases(thumbnails) if thumbnails else ([], None)
    # "</" can end a script element early: JSON escapes it as "<\/" (still the same JSON string)
    blob = json.dumps(payload(data, sizes), separators=(",", ":")).replace("</", "<\\/")
    title = html.escape(data.title)
    return (
        "<!doctype html><html><head><meta charset='utf-8'><meta name='viewport' content='width=device-width'>"
        f"<title>cnnscope {title}</title><style>{_STYLE}</style></head><body>"
        f"<header><h1>{title}</h1><label>colour by <select id='colour'><option value='label'>true class</option>"
        "<option value='predicted'>prediction</option><option value='correct'>correct / wrong</option>"
        "<option value='cluster'>audit cluster</option></select></label><button id='reset'>reset zoom</button>"
        "<span>ring: misclassified · wheel: zoom · drag: pan · click: image and map</span>"
        "<div id='legend'></div></header>"
        "<div id='wrap'><canvas id='plot'></canvas><div id='tip'></div>"
        "<div id='detail'><button id='close'>×</button><div id='detail-body'></div></div></div>"
        f"<script type='application/json' id='scatter-data'>{blob}</script>"
        f"<script type='application/json' id='scatter-atlases'>{json.dumps(sheets)}</script>"
        f"<script>{_SCRIPT}</script></body></html>"
    )


def scatter_png(data: ScatterData, path, *, size: float = 7.0, dpi: int = 120):
    """The same plot as a static PNG (coloured by true class, misclassified points ringed in black), written to
    ``path`` (a file name, returned as a Path, or a binary file object)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    points = np.asarray(data.points, dtype=np.float32)
    labels = np.asarray(data.labels)
    wrong = labels != np.asarray(data.predicted)
    palette = colours(len(data.class_names))
    figure = Figure(figsize=(size + (2.2 if len(data.class_names) <= 20 else 0), size), dpi=dpi)
    axes = figure.add_subplot()
    marker = max(0.5, min(16.0, 4000.0 / max(1, len(points))))
    axes.scatter(points[:, 0], points[:, 1], s=marker, c=[palette[int(c)] for c in labels], linewidths=0)
    if wrong.any():
        axes.scatter(
            points[wrong, 0], points[wrong, 1], s=marker * 3 + 6, facecolors="none", edgecolors="black", linewidths=0.6
        )
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_title(data.title, fontsize=10)
    if len(data.class_names) <= 20:
        present = sorted({int(c) for c in labels})
        handles = [
            Line2D([], [], marker="o", linestyle="", color=palette[c], label=data.class_names[c]) for c in present
        ]
        handles.append(
            Line2D([], [], marker="o", linestyle="", markerfacecolor="none", color="black", label="misclassified")
        )
        axes.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    figure.tight_layout()
    target = Path(path) if isinstance(path, (str, os.PathLike)) else path
    figure.savefig(target, format="png")
    return target
