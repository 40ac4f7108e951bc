// Speech: text to audio, played in the page.

import { api } from "./api.js";
import { $, el, status } from "./dom.js";

const panel = $("#speech");
let lastAudio = null; // {blob, name}: the transcription panel can send it back

export const lastSpeech = () => lastAudio;

export async function loadVoices() {
  const select = $("[name=voice]", panel);
  try {
    const body = await api("/v1/voices");
    const voices = body.data.flatMap((group) => group.voices);
    const seeded = select.value;
    select.replaceChildren(el("option", { value: seeded }, `${seeded} (Together's name)`),
      ...voices.map((v) => el("option", { value: v.id }, `${v.name} (${v.id})`)));
  } catch {
    // no audio family served: the default stays, and speaking says why
  }
}

async function speak() {
  const audio = $("audio", panel);
  const format = $("[name=format]", panel).value;
  try {
    status(panel, "synthesizing…");
    const response = await api("/v1/audio/speech", {
      json: {
        model: $("[name=model]", panel).value,
        input: $("[name=input]", panel).value,
        voice: $("[name=voice]", panel).value,
        response_format: format,
      },
      raw: true,
    });
    const blob = await response.blob();
    lastAudio = { blob, name: `speech.${format}` };
    if (audio.src) URL.revokeObjectURL(audio.src);
    audio.src = URL.createObjectURL(blob);
    audio.addEventListener("loadedmetadata", () => {
      status(panel, `${audio.duration.toFixed(2)} s of audio, ${blob.size} bytes`, "ok");
    }, { once: true });
    await audio.play().catch(() => {}); // a browser may refuse to autoplay: the controls remain
  } catch (err) {
    status(panel, err.message, "error");
  }
}

export function init() {
  $("[name=run]", panel).addEventListener("click", speak);
}
