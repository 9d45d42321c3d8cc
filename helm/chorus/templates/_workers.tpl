{{/*
The agent workers: the default one (`worker`, unless worker.enabled is false), then one per entry of
`workerPools`. Every per-worker object (Deployment, ConfigMap, internal Service, HPA,
PodDisruptionBudget, NetworkPolicy) ranges over this list, so a pool gets exactly what the default
worker gets. Each worker is a dict:

  name       the object name after the fullname: "worker", or "worker-<pool>"
  component  app.kubernetes.io/component: "agent-worker", or "agent-worker-pool" for every pool.
             The default worker's selector (name, instance, component) is immutable and predates
             pools, so pool pods must differ from it in one of those labels, or the default
             worker's Service, budget and policy would select them too.
  pool       the pool's name, "" for the default worker: the chorus/worker-pool label, which tells
             the pools' selectors apart
  path       where its values are, for error messages: "worker" or "workerPools[<i>]"
  agents     its WORKER_AGENTS ("": every agent, and then the variable is not set)
  values     its settings: `worker`, with a pool's own keys over it (chorus.overlay)

Returned as JSON: (include "chorus.workers" . | fromJson).workers
*/}}
{{- define "chorus.workers" -}}
{{- $fullname := include "chorus.fullname" . }}
{{- $workers := list }}
{{- if .Values.worker.enabled }}
{{- $workers = append $workers (dict "name" "worker" "component" "agent-worker" "pool" "" "path" "worker"
      "agents" (.Values.worker.agents | default "") "values" .Values.worker) }}
{{- end }}
{{- range $i, $pool := .Values.workerPools }}
{{- $values := include "chorus.overlay" (dict "base" (omit $.Values.worker "enabled" "agents") "over" (omit $pool "name" "agents")) | fromJson }}
{{- /* Each pool's workers report their own pools' queue (chorus_run_queue_depth), so its HPA
scales on the series of its own internal Service unless told otherwise. */}}
{{- if not (hasKey (get $pool "autoscaling" | default dict) "runsMetricSelector") }}
{{- $_ := set $values.autoscaling "runsMetricSelector" (dict "service" (printf "%s-worker-%s-internal" $fullname $pool.name)) }}
{{- end }}
{{- $workers = append $workers (dict "name" (printf "worker-%s" $pool.name) "component" "agent-worker-pool"
      "pool" $pool.name "path" (printf "workerPools[%d]" $i) "agents" $pool.agents "values" $values) }}
{{- end }}
{{- dict "workers" $workers | toJson }}
{{- end }}

{{/*
`base` with `over` on top, as JSON: a key `over` sets replaces base's, even with 0, false or null
(sprig's merge would keep base's there, so a pool could not say `replicas: 0`); maps merge key by
key, except the free-form ones a pool means whole (nodeSelector, affinity, an HPA's behavior and
runsMetricSelector); lists are replaced. Call with (dict "base" ... "over" ...).
*/}}
{{- define "chorus.overlay" -}}
{{- $out := deepCopy .base }}
{{- range $key, $value := .over }}
{{- $base := get $out $key }}
{{- if and (kindIs "map" $value) (kindIs "map" $base) (not (has $key (list "nodeSelector" "affinity" "behavior" "runsMetricSelector"))) }}
{{- $_ := set $out $key (include "chorus.overlay" (dict "base" $base "over" $value) | fromJson) }}
{{- else }}
{{- $_ := set $out $key $value }}
{{- end }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/*
One worker's ConfigMap, its non-secret settings. Its Deployment hashes this into checksum/config,
so a change to one pool's settings rolls that pool only. Ends with a newline, as the file rendering
it did before pools (the default worker's checksum stays what it was). Call with (dict "ctx" $ "w" worker).
*/}}
{{- define "chorus.workerConfigMap" -}}
{{- $v := .w.values -}}
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ include "chorus.fullname" .ctx }}-{{ .w.name }}
  labels:
    {{- include "chorus.labels" (dict "ctx" .ctx "component" .w.component "pool" .w.pool) | nindent 4 }}
data:
  INTERNAL_PORT: {{ $v.internalPort | quote }}
  WORKER_CONCURRENCY: {{ $v.concurrency | quote }}
  WORKER_PROCESSES: {{ $v.processes | quote }}
  WORKER_DRAIN_SECONDS: {{ $v.drainSeconds | quote }}
  {{- with .w.agents }}
  WORKER_AGENTS: {{ . | quote }}
  {{- end }}
  LLM_BASE_URL: {{ $v.llm.baseUrl | quote }}
  LLM_MODEL: {{ $v.llm.model | quote }}
  LOG_LEVEL: {{ .ctx.Values.config.logLevel | quote }}
  {{- with include "chorus.redisEnv" .ctx | trim }}
  {{- . | nindent 2 }}
  {{- end }}
  {{- range $name, $value := $v.extraEnv }}
  {{ $name }}: {{ $value | quote }}
  {{- end }}
{{ end }}

{{/*
The components with per-component objects (HPA, PodDisruptionBudget, internal Service,
NetworkPolicy): the ws-node, then every worker of chorus.workers, in its shape.
Returned as JSON: (include "chorus.components" . | fromJson).components
*/}}
{{- define "chorus.components" -}}
{{- $node := dict "name" "ws-node" "component" "ws-node" "pool" "" "path" "node" "agents" "" "values" .Values.node }}
{{- dict "components" (prepend (include "chorus.workers" . | fromJson).workers $node) | toJson }}
{{- end }}
