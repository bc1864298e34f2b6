// voxbus caller page: one WebRTC call to the bridge (plain JS, no build step).
//
// The page creates both data channels before its offer (the bridge binds to
// them by label): `llm_tokens` (unordered, no retransmits) brings token deltas
// {t: turn, s: seq, d: text, f: final}; `control` (reliable) brings session
// metadata (state, transcript, turn_metrics, interrupted, heard, busy, error) and takes
// {"type": "interrupt"}. window.voxbus exposes counters for tests.
"use strict";

const $ = (id) => document.getElementById(id);
const LEVEL_TICK_MS = 20;
const AGENT_AUDIBLE_RMS = 0.01; // about -40 dBFS
const BARGE_IN_RMS = 0.04; // mic level that counts as the caller talking
const BARGE_IN_TICKS = 10; // 200 ms of it while the agent speaks sends an interrupt
const STATS_MS = 500; // how often the agent audio receiver's playout delay is sampled

const vb = (window.voxbus = {
  state: "idle", sessionId: null, connected: false,
  agentAudioTicks: 0, agentPeak: 0, micPeak: 0,
  userTranscripts: [], agentText: {}, heardText: {}, unheardText: {}, tokenMessages: 0,
  interruptsSent: 0, interruptedTurns: [], metrics: [], errors: [], busy: [],
  // The agent audio's jitter buffer: the target the bridge asks for (GET /v1/config), whether this
  // browser took it, and the playout delay it achieves (getStats: jitterBufferDelay / emitted samples).
  jitterTargetMs: null, jitterTargetApplied: false, playoutDelayMs: null, playoutDelaySamples: [],
});

let pc = null, control = null, mic = null, audioCtx = null, levelTimer = null, statsTimer = null;
let micAnalyser = null, agentAnalyser = null, loudTicks = 0, interruptedTurn = -1, currentTurn = -1;
const turns = new Map(); // turn -> {user, agent, tokens: [], row}

function status(text) { $("status").textContent = text || ""; }

function setState(state, turn) {
  vb.state = state;
  if (typeof turn === "number") currentTurn = turn;
  const el = $("state");
  el.textContent = state.replace("_", " ");
  el.className = `state state-${state}`;
}

function turnEntry(turn) {
  let t = turns.get(turn);
  if (!t) {
    const user = document.createElement("li");
    user.className = "user partial";
    const agent = document.createElement("li");
    agent.className = "agent";
    t = { user, agent, tokens: [], finalText: null };
    turns.set(turn, t);
    $("conversation").append(user, agent);
  }
  return t;
}

function renderAgent(turn) {
  const t = turnEntry(turn);
  const text = t.finalText ?? t.tokens.filter((d) => d !== undefined).join("");
  vb.agentText[turn] = text;
  if (t.heard === undefined) {
    t.agent.textContent = text;
    return;
  }
  // Cut by a barge-in: what the caller heard (what the agent's context now holds), then the rest, set apart.
  const full = (t.full || text).trim();
  const heard = t.heard.trim();
  const words = full.split(/\s+/), heardWords = heard ? heard.split(/\s+/) : [];
  const rest = words.slice(heardWords.length).join(" ");
  const said = document.createElement("span");
  said.className = "heard";
  said.textContent = heard;
  const unheard = document.createElement("span");
  unheard.className = "unheard";
  unheard.textContent = rest ? (heard ? " " : "") + rest : "";
  unheard.title = "generated but not heard: cut by the barge-in (not in the agent's memory)";
  t.agent.replaceChildren(said, unheard);
  vb.heardText[turn] = heard;
  vb.unheardText[turn] = rest;
}

function onTokens(raw) {
  let m;
  try { m = JSON.parse(raw); } catch { return; }
  if (typeof m !== "object" || m === null || typeof m.t !== "number" || typeof m.s !== "number") return;
  vb.tokenMessages += 1;
  const t = turnEntry(m.t);
  if (m.s >= 0 && m.s < 100000) t.tokens[m.s] = String(m.d ?? ""); // unordered channel: place by seq
  renderAgent(m.t);
}

function onControl(raw) {
  let m;
  try { m = JSON.parse(raw); } catch { return; }
  if (typeof m !== "object" || m === null) return;
  switch (m.type) {
    case "session":
      vb.sessionId = m.session;
      $("session").textContent = m.session;
      break;
    case "state":
      setState(m.state, m.turn);
      if (m.state === "agent_speaking") loudTicks = 0;
      break;
    case "transcript": {
      if (m.role !== "user") break;
      const t = turnEntry(m.turn);
      t.user.textContent = m.text;
      t.user.classList.toggle("partial", !m.final);
      if (m.final && m.text.trim()) vb.userTranscripts.push(m.text);
      break;
    }
    case "turn_metrics":
      if (vb.playoutDelayMs != null) m.playout_delay_ms = vb.playoutDelayMs;
      vb.metrics.push(m);
      if (m.agent_text) { turnEntry(m.turn).finalText = m.agent_text; renderAgent(m.turn); }
      drawWaterfall(m);
      break;
    case "interrupted":
      vb.interruptedTurns.push(m.turn);
      turnEntry(m.turn).agent.classList.add("interrupted");
      break;
    case "heard": {
      const t = turnEntry(m.turn);
      t.heard = String(m.text ?? "");
      t.full = String(m.full ?? "");
      renderAgent(m.turn);
      break;
    }
    case "busy":
      vb.busy.push(m);
      status(`the agent is busy (${m.stage}): ${m.reason}`);
      break;
    case "ended":
      status(`call ended: ${m.reason}`);
      break;
    case "error":
      vb.errors.push(m);
      status(`turn ${m.turn}: ${m.stage} failed: ${m.reason}`);
      break;
    default:
      break; // pong, cancelled, false_interruption: nothing to show
  }
}

function drawWaterfall(m) {
  const t = turnEntry(m.turn);
  if (!t.row) {
    t.row = document.createElement("div");
    t.row.className = "row";
    $("waterfall").append(t.row);
  }
  const stages = [
    ["endpoint", m.endpoint_ms], ["asr", m.asr_ms], ["llm", m.llm_ttft_ms], ["tts", m.tts_first_audio_ms],
  ].map(([k, v]) => [k, Math.max(0, Number(v) || 0)]);
  const response = Number(m.response_ms) || 0;
  const staged = stages.slice(1).reduce((a, [, v]) => a + v, 0);
  stages.push(["other", Math.max(0, response - staged)]);
  const total = stages.reduce((a, [, v]) => a + v, 0) || 1;
  const label = document.createElement("span");
  label.textContent = `turn ${m.turn}`;
  const bar = document.createElement("div");
  bar.className = "bar";
  for (const [k, v] of stages) {
    const seg = document.createElement("span");
    seg.className = `seg seg-${k}`;
    seg.style.width = `${(100 * v) / total}%`;
    seg.title = `${k}: ${v.toFixed(0)} ms`;
    bar.append(seg);
  }
  const sum = document.createElement("span");
  sum.textContent = m.response_ms == null ? "…" : `${(stages[0][1] + response).toFixed(0)} ms`;
  sum.title = "end of speech wait + response (first agent audio sent after the end of speech)";
  const jb = document.createElement("span");
  jb.className = "jitter";
  if (m.playout_delay_ms != null) {
    jb.textContent = `+${m.playout_delay_ms.toFixed(0)} ms`;
    jb.title = `playout delay in this browser (jitter buffer; target ${vb.jitterTargetMs ?? "default"} ms)`;
  }
  t.row.replaceChildren(label, bar, sum, jb);
}

// The receiver's average playout delay since the last sample, in ms (null until audio flowed).
let lastJb = null;
async function sampleJitterBuffer(receiver) {
  const stats = await receiver.getStats();
  for (const s of stats.values()) {
    if (s.type !== "inbound-rtp" || s.kind !== "audio" || !s.jitterBufferEmittedCount) continue;
    if (lastJb && s.jitterBufferEmittedCount > lastJb.count) {
      const ms = (1000 * (s.jitterBufferDelay - lastJb.delay)) / (s.jitterBufferEmittedCount - lastJb.count);
      vb.playoutDelayMs = ms;
      vb.playoutDelaySamples.push(ms);
      if (vb.playoutDelaySamples.length > 600) vb.playoutDelaySamples.shift();
    }
    lastJb = { delay: s.jitterBufferDelay, count: s.jitterBufferEmittedCount };
  }
}

function applyJitterTarget(receiver) {
  const target = vb.jitterTargetMs;
  if (typeof target !== "number" || target < 0) return;
  if ("jitterBufferTarget" in receiver) {
    receiver.jitterBufferTarget = target; // ms (Chrome 114+, Safari, Firefox 130+)
    vb.jitterTargetApplied = true;
  } else if ("playoutDelayHint" in receiver) {
    receiver.playoutDelayHint = target / 1000; // older Chrome: seconds
    vb.jitterTargetApplied = true;
  }
}

function rms(analyser, buf) {
  analyser.getFloatTimeDomainData(buf);
  let s = 0;
  for (let i = 0; i < buf.length; i++) s += buf[i] * buf[i];
  return Math.sqrt(s / buf.length);
}

function startLevels() {
  const micBuf = new Float32Array(micAnalyser.fftSize);
  const agentBuf = new Float32Array(1024);
  levelTimer = setInterval(() => {
    const micLevel = rms(micAnalyser, micBuf);
    const agentLevel = agentAnalyser ? rms(agentAnalyser, agentBuf) : 0;
    $("mic-level").value = micLevel;
    $("agent-level").value = agentLevel;
    vb.micPeak = Math.max(vb.micPeak, micLevel);
    vb.agentPeak = Math.max(vb.agentPeak, agentLevel);
    if (agentLevel > AGENT_AUDIBLE_RMS) vb.agentAudioTicks += 1;
    // barge-in: the caller is louder than a threshold (and than the echo of the agent) for long enough
    if (vb.state === "agent_speaking" && $("bargein").checked && micLevel > BARGE_IN_RMS && micLevel > agentLevel * 0.5) {
      loudTicks += 1;
      if (loudTicks >= BARGE_IN_TICKS && interruptedTurn !== currentTurn) sendInterrupt();
    } else {
      loudTicks = 0;
    }
  }, LEVEL_TICK_MS);
}

function sendInterrupt() {
  if (!control || control.readyState !== "open") return;
  control.send(JSON.stringify({ type: "interrupt" }));
  interruptedTurn = currentTurn;
  vb.interruptsSent += 1;
}

function gatheringDone(peer, timeoutMs) {
  if (peer.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (peer.iceGatheringState === "complete") { peer.removeEventListener("icegatheringstatechange", done); resolve(); } };
    peer.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, timeoutMs); // the bridge takes no trickled candidates: send what we have
  });
}

async function call() {
  const token = $("token").value.trim();
  if (!token) { status("enter the bridge token"); return; }
  status("");
  $("call").disabled = true;
  const auth = { Authorization: `Bearer ${token}` };
  try {
    const cfg = await fetch("/v1/config", { headers: auth });
    if (cfg.status === 401) throw new Error("wrong token");
    const { ice_servers: iceServers = [], jitter_target_ms: jitterTarget = null } = await cfg.json();
    vb.jitterTargetMs = typeof jitterTarget === "number" ? jitterTarget : null;

    audioCtx = new AudioContext();
    await audioCtx.resume();
    mic = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
    });
    micAnalyser = audioCtx.createAnalyser();
    micAnalyser.fftSize = 1024;
    audioCtx.createMediaStreamSource(mic).connect(micAnalyser);

    pc = new RTCPeerConnection({ iceServers });
    for (const track of mic.getAudioTracks()) pc.addTrack(track, mic);
    const tokens = pc.createDataChannel("llm_tokens", { ordered: false, maxRetransmits: 0 });
    tokens.onmessage = (e) => onTokens(e.data);
    control = pc.createDataChannel("control");
    control.onmessage = (e) => onControl(e.data);
    pc.ontrack = (e) => {
      applyJitterTarget(e.receiver);
      lastJb = null;
      statsTimer = setInterval(() => sampleJitterBuffer(e.receiver).catch(() => {}), STATS_MS);
      const stream = e.streams[0] || new MediaStream([e.track]);
      $("agent-audio").srcObject = stream; // Chrome only feeds WebAudio from a remote stream that also plays
      agentAnalyser = audioCtx.createAnalyser();
      agentAnalyser.fftSize = 1024;
      audioCtx.createMediaStreamSource(stream).connect(agentAnalyser);
    };
    pc.onconnectionstatechange = () => {
      vb.connected = pc.connectionState === "connected";
      if (["failed", "closed", "disconnected"].includes(pc.connectionState)) status(`connection ${pc.connectionState}`);
    };

    await pc.setLocalDescription(await pc.createOffer());
    await gatheringDone(pc, 3000);
    const resp = await fetch("/v1/offer", {
      method: "POST",
      headers: { ...auth, "Content-Type": "application/json" },
      body: JSON.stringify({ sdp: pc.localDescription.sdp, type: "offer" }),
    });
    const answer = await resp.json().catch(() => ({}));
    if (!resp.ok) throw new Error(`${resp.status} ${answer.error || ""}: ${answer.message || resp.statusText}`);
    vb.sessionId = answer.session_id;
    $("session").textContent = answer.session_id;
    await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
    startLevels();
    setState("listening");
    $("hangup").disabled = false;
    $("stop").disabled = false;
  } catch (err) {
    status(`call failed: ${err.message || err}`);
    vb.errors.push({ type: "call", reason: String(err.message || err) });
    hangup();
  }
}

function hangup() {
  if (levelTimer) clearInterval(levelTimer);
  if (statsTimer) clearInterval(statsTimer);
  levelTimer = statsTimer = null;
  if (pc) pc.close();
  if (mic) mic.getTracks().forEach((t) => t.stop());
  if (audioCtx) audioCtx.close();
  pc = control = mic = audioCtx = micAnalyser = agentAnalyser = null;
  vb.connected = false;
  setState("idle");
  $("call").disabled = false;
  $("hangup").disabled = true;
  $("stop").disabled = true;
}

$("token").value = new URLSearchParams(location.search).get("token") || "";
// The token came in the URL (voxbus up prints it that way): keep it out of the history, bookmarks and
// anything copied from the address bar. The server also sends Referrer-Policy: no-referrer.
if (new URLSearchParams(location.search).has("token")) history.replaceState(null, "", location.pathname);
$("call").addEventListener("click", call);
$("hangup").addEventListener("click", hangup);
$("stop").addEventListener("click", sendInterrupt);
