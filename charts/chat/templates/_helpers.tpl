{{/* Chart name, truncated to the 63 characters a label allows. */}}
{{- define "chat.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, unless the release name already contains the chart name. */}}
{{- define "chat.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Name of one component's resources: <fullname>-<component>. */}}
{{- define "chat.componentName" -}}
{{- printf "%s-%s" (include "chat.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "chat.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every resource of a component. */}}
{{- define "chat.labels" -}}
helm.sh/chart: {{ include "chat.chart" .root }}
{{ include "chat.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: {{ include "chat.name" .root }}
{{- end }}

{{/* Selector labels: name, instance and component only, so they never change on upgrade. */}}
{{- define "chat.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chat.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Image reference of a component: [registry/]repository, then @digest when the component has one,
else :tag (the component's tag winning over image.tag, which wins over the appVersion). The
registry is global.imageRegistry (set once by an umbrella chart), else image.registry. */}}
{{- define "chat.image" -}}
{{- $registry := dig "imageRegistry" "" (.root.Values.global | default dict) | default .root.Values.image.registry }}
{{- $repository := ternary (printf "%s/%s" $registry .values.image.repository) .values.image.repository (not (empty $registry)) }}
{{- if .values.image.digest }}
{{- printf "%s@%s" $repository .values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repository (.values.image.tag | default .root.Values.image.tag | default .root.Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* Service account of the api and the workers (no Kubernetes API access). */}}
{{- define "chat.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "chat.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Service account of counter-sync (Lease and Events). */}}
{{- define "chat.counterSyncServiceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- include "chat.componentName" (dict "root" . "component" "counter-sync") }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Secret holding the four connection URLs. */}}
{{- define "chat.connectionSecretName" -}}
{{- default (printf "%s-connections" (include "chat.fullname" .)) .Values.connections.existingSecret }}
{{- end }}

{{- define "chat.configMapName" -}}
{{- printf "%s-config" (include "chat.fullname" .) }}
{{- end }}

{{/* Connection URLs as environment (context: secret, the Secret's name, and optionally keys, the
URLs a component reads; all four without it). */}}
{{- define "chat.connectionEnv" -}}
{{- $secret := .secret }}
{{- range $key := .keys | default (list "DATABASE_URL" "REDIS_URL" "AMQP_URL" "ELASTICSEARCH_URL") }}
- name: {{ $key }}
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $key }}
{{- end }}
{{- end }}

{{/* Environment of every container of a component (context: root, values, and optionally
connections: the URLs it reads, all four without it): the connection URLs from the release's
Secret (none in embedded mode), then the component's extraEnv. */}}
{{- define "chat.env" -}}
{{- if not .root.Values.embedded.enabled }}
{{- include "chat.connectionEnv" (dict "secret" (include "chat.connectionSecretName" .root) "keys" .connections) }}
{{- end }}
{{- with .values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Checksums of what a component's pods read at start, so that they roll when it changes: the
settings, and the connection URLs, admin token and client-token secret the chart itself stores in
Secrets (a Secret of your own is yours to roll after; generated ones are kept across upgrades). */}}
{{- define "chat.checksums" -}}
checksum/config: {{ include "chat.configData" . | sha256sum }}
{{- if not (or .Values.connections.existingSecret .Values.embedded.enabled) }}
checksum/connections: {{ include "chat.connectionData" . | sha256sum }}
{{- end }}
{{- with .Values.auth.adminToken }}
{{- /* Salted with the release's namespace and name: the bare hash of a token in an annotation
anyone may read would let a precomputed table find a weak one. */}}
checksum/admin-token: {{ printf "chat-admin-token:%s:%s:%s" $.Release.Namespace $.Release.Name . | sha256sum }}
{{- end }}
{{- with .Values.auth.clientTokenSecret }}
checksum/client-token-secret: {{ printf "chat-client-token-secret:%s:%s:%s" $.Release.Namespace $.Release.Name . | sha256sum }}
{{- end }}
{{- end }}

{{/* Labels of a component's pods: the component's labels, then its podLabels. */}}
{{- define "chat.podLabels" -}}
{{ include "chat.labels" . }}
{{- with .values.podLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Secret holding the operator's secrets the api reads, the admin token (CHAT_ADMIN_TOKEN) and the
client-token secret (CHAT_CLIENT_TOKEN_SECRET): auth.existingSecret or the chart's own. */}}
{{- define "chat.adminTokenSecretName" -}}
{{- default (printf "%s-admin-token" (include "chat.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{/* One key of the chart's own operator Secret (context: root, key, given, length): the given value,
else the value the Secret already holds under that key in the cluster (kept across upgrades), else
a new random one of that many alphanumerics (first install, a Secret from before the key existed,
or a render without cluster access such as `helm template`). */}}
{{- define "chat.authSecretValue" -}}
{{- if .given }}
{{- .given }}
{{- else }}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace (include "chat.adminTokenSecretName" .root) }}
{{- $data := dig "data" (dict) $existing }}
{{- if hasKey $data .key }}
{{- index $data .key | b64dec }}
{{- else }}
{{- randAlphaNum (int .length) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The admin token of the chart's own Secret: auth.adminToken, else kept, else 40 random characters. */}}
{{- define "chat.adminToken" -}}
{{- include "chat.authSecretValue" (dict "root" . "key" "CHAT_ADMIN_TOKEN" "given" .Values.auth.adminToken "length" 40) }}
{{- end }}

{{/* The client-token secret of the chart's own Secret: auth.clientTokenSecret, else kept, else 48
random characters (about 285 bits). */}}
{{- define "chat.clientTokenSecret" -}}
{{- include "chat.authSecretValue" (dict "root" . "key" "CHAT_CLIENT_TOKEN_SECRET" "given" .Values.auth.clientTokenSecret "length" 48) }}
{{- end }}

{{/* The api's admin token and client-token secret, from a Secret (never from the ConfigMap). An
auth.existingSecret of before client tokens may lack CHAT_CLIENT_TOKEN_SECRET: the key is optional
there (the api then keeps a secret in the database and warns), never in the chart's own Secret. */}}
{{- define "chat.authEnv" -}}
- name: CHAT_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "chat.adminTokenSecretName" . }}
      key: CHAT_ADMIN_TOKEN
- name: CHAT_CLIENT_TOKEN_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "chat.adminTokenSecretName" . }}
      key: CHAT_CLIENT_TOKEN_SECRET
      {{- if .Values.auth.existingSecret }}
      optional: true
      {{- end }}
{{- end }}

{{/* True (non-empty) when a CA bundle for the backing services' TLS is configured. */}}
{{- define "chat.tlsCaEnabled" -}}
{{- if or .Values.connections.tls.caSecret .Values.connections.tls.caConfigMap }}true{{ end }}
{{- end }}

{{- define "chat.tlsCaDir" -}}
/etc/chat/tls
{{- end }}

{{/* Volume of the CA bundle (a list entry of a pod's volumes); empty without one. */}}
{{- define "chat.tlsCaVolumes" -}}
{{- $tls := .Values.connections.tls }}
{{- if $tls.caSecret }}
- name: tls-ca
  secret:
    secretName: {{ $tls.caSecret }}
    items:
      - {key: {{ $tls.caKey | quote }}, path: ca.crt}
{{- else if $tls.caConfigMap }}
- name: tls-ca
  configMap:
    name: {{ $tls.caConfigMap }}
    items:
      - {key: {{ $tls.caKey | quote }}, path: ca.crt}
{{- end }}
{{- end }}

{{/* Read-only mount of the CA bundle (a list entry of a container's volumeMounts). */}}
{{- define "chat.tlsCaVolumeMounts" -}}
{{- if include "chat.tlsCaEnabled" . }}
- name: tls-ca
  mountPath: {{ include "chat.tlsCaDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/* envFrom of a component's containers (context: root, values): the settings, then extraEnvFrom. */}}
{{- define "chat.envFrom" -}}
- configMapRef:
    name: {{ include "chat.configMapName" .root }}
{{- with .values.extraEnvFrom }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Pod-level settings shared by every workload (context: root, values, and optionally volumes:
the component's own volumes): pull secrets (global and the chart's), security context,
scheduling, and the volumes (the CA bundle, the component's own, then its extraVolumes). */}}
{{- define "chat.podSpecCommon" -}}
{{- $pullSecrets := concat (dig "imagePullSecrets" list (.root.Values.global | default dict)) .root.Values.imagePullSecrets | uniq }}
{{- with $pullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
{{- with .values.priorityClassName }}
priorityClassName: {{ . | quote }}
{{- end }}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $volumes := concat (include "chat.tlsCaVolumes" .root | fromYamlArray) (.volumes | default list) (.values.extraVolumes | default list) }}
{{- with $volumes }}
volumes:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* volumeMounts of a component's container (context: root, values, and optionally mounts): the CA
bundle, the component's own mounts, then its extraVolumeMounts; nothing without any. */}}
{{- define "chat.volumeMounts" -}}
{{- $mounts := concat (include "chat.tlsCaVolumeMounts" .root | fromYamlArray) (.mounts | default list) (.values.extraVolumeMounts | default list) }}
{{- with $mounts }}
volumeMounts:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Non-secret settings as a map: the ConfigMap's data, and the migration hook's environment. */}}
{{- define "chat.configData" -}}
RUST_LOG: {{ .Values.config.logLevel | quote }}
CHAT_REDIS_PREFIX: {{ .Values.config.redisKeyPrefix | quote }}
CHAT_AMQP_PREFIX: {{ .Values.config.amqpPrefix | quote }}
CHAT_ES_INDEX: {{ .Values.config.elasticsearchIndex | quote }}
CHAT_ES_REPLICAS: {{ .Values.config.elasticsearchReplicas | quote }}
CHAT_NUMBER_BLOCK_SIZE: {{ .Values.config.numberBlockSize | quote }}
CHAT_DATABASE_MAX_CONNECTIONS: {{ .Values.config.databaseMaxConnections | quote }}
CHAT_DEFAULT_PAGE_SIZE: {{ .Values.config.defaultPageSize | quote }}
CHAT_MAX_PAGE_SIZE: {{ .Values.config.maxPageSize | quote }}
CHAT_CONSUMER_PREFETCH: {{ .Values.config.consumerPrefetch | quote }}
CHAT_CONSUMER_MAX_BYTES_IN_FLIGHT: {{ .Values.config.consumerMaxBytesInFlight | int64 | quote }}
CHAT_AMQP_QUEUE_TYPE: {{ .Values.config.amqpQueueType | quote }}
CHAT_AMQP_DELIVERY_LIMIT: {{ .Values.config.amqpDeliveryLimit | quote }}
CHAT_BATCH_MAX_SIZE: {{ .Values.config.batchMaxSize | quote }}
CHAT_BATCH_MAX_WAIT_MS: {{ .Values.config.batchMaxWaitMs | quote }}
CHAT_CONNECT_TIMEOUT_MS: {{ .Values.config.connectTimeoutMs | int64 | quote }}
CHAT_DEPENDENCY_TIMEOUT_MS: {{ .Values.config.dependencyTimeoutMs | int64 | quote }}
CHAT_DOCS_ENABLED: {{ .Values.api.docs.enabled | quote }}
CHAT_RATE_LIMIT_PER_TOKEN: {{ .Values.api.rateLimits.perToken | int64 | quote }}
CHAT_RATE_LIMIT_PER_TOKEN_BURST: {{ .Values.api.rateLimits.perTokenBurst | int64 | quote }}
CHAT_RATE_LIMIT_PER_ADDRESS: {{ .Values.api.rateLimits.perAddress | int64 | quote }}
CHAT_RATE_LIMIT_PER_ADDRESS_BURST: {{ .Values.api.rateLimits.perAddressBurst | int64 | quote }}
{{- if and (gt (int .Values.api.trustedProxyHops) 0) (not (and .Values.networkPolicy.enabled .Values.networkPolicy.apiIngressFrom)) }}
{{- fail "api.trustedProxyHops > 0 trusts X-Forwarded-For, which any pod could forge: restrict who reaches the api (networkPolicy.enabled with networkPolicy.apiIngressFrom: your ingress controller)" }}
{{- end }}
CHAT_TRUSTED_PROXY_HOPS: {{ .Values.api.trustedProxyHops | int64 | quote }}
CHAT_MAX_CONNECTIONS: {{ .Values.api.maxConnections | int64 | quote }}
{{- if gt (int .Values.api.maxConnectionsPerAddress) (int .Values.api.maxConnections) }}
{{- fail "api.maxConnectionsPerAddress must be at most api.maxConnections" }}
{{- end }}
CHAT_MAX_CONNECTIONS_PER_ADDRESS: {{ .Values.api.maxConnectionsPerAddress | int64 | quote }}
CHAT_HEADER_READ_TIMEOUT_MS: {{ .Values.api.headerReadTimeoutMs | int64 | quote }}
CHAT_BODY_TIMEOUT_MS: {{ .Values.api.bodyTimeoutMs | int64 | quote }}
CHAT_REQUEST_TIMEOUT_MS: {{ .Values.api.requestTimeoutMs | int64 | quote }}
CHAT_SEARCH_TIMEOUT_MS: {{ .Values.api.searchTimeoutMs | int64 | quote }}
{{- if gt (int .Values.api.streams.perReplica) (div (int .Values.api.maxConnections) 2) }}
{{- fail "api.streams.perReplica must be at most half of api.maxConnections (streams hold their connections)" }}
{{- end }}
CHAT_STREAMS_PER_REPLICA: {{ .Values.api.streams.perReplica | int64 | quote }}
CHAT_STREAMS_PER_APPLICATION: {{ .Values.api.streams.perApplication | int64 | quote }}
CHAT_STREAMS_PER_ADDRESS: {{ .Values.api.streams.perAddress | int64 | quote }}
CHAT_STREAM_MAX_LIFETIME_SECONDS: {{ .Values.api.streams.maxLifetimeSeconds | int64 | quote }}
CHAT_STREAM_HEARTBEAT_MS: {{ .Values.api.streams.heartbeatMs | int64 | quote }}
CHAT_STREAM_BUFFERED_CHANGES: {{ .Values.api.streams.bufferedChanges | int64 | quote }}
CHAT_APPLICATION_CREATION: {{ .Values.api.applicationCreation | quote }}
CHAT_TOKEN_ROTATION_OVERLAP_SECONDS: {{ .Values.api.tokenRotationOverlapSeconds | int64 | quote }}
CHAT_CLIENT_TOKEN_MAX_LIFETIME_SECONDS: {{ .Values.api.clientTokens.maxLifetimeSeconds | int64 | quote }}
CHAT_CLIENT_TOKEN_REVOCATION_POLL_MS: {{ .Values.api.clientTokens.revocationPollMs | int64 | quote }}
{{- with .Values.api.cors.allowedOrigins }}
CHAT_CORS_ALLOWED_ORIGINS: {{ join "," . | quote }}
{{- end }}
CHAT_MAX_CHATS_PER_APPLICATION: {{ .Values.api.maxChatsPerApplication | int64 | quote }}
CHAT_MAX_MESSAGES_PER_MINUTE_PER_APPLICATION: {{ .Values.api.maxMessagesPerMinutePerApplication | int64 | quote }}
{{- if include "chat.tlsCaEnabled" . }}
CHAT_TLS_CA_FILE: {{ printf "%s/ca.crt" (include "chat.tlsCaDir" .) | quote }}
{{- end }}
{{- with .Values.config.otlpEndpoint }}
OTEL_EXPORTER_OTLP_ENDPOINT: {{ . | quote }}
{{- end }}
OTEL_EXPORTER_OTLP_PROTOCOL: {{ .Values.config.otlpProtocol | quote }}
OTEL_TRACES_SAMPLER: {{ .Values.config.tracesSampler | quote }}
OTEL_TRACES_SAMPLER_ARG: {{ .Values.config.tracesSamplerArg | toString | quote }}
{{- with .Values.config.pushgatewayUrl }}
CHAT_PUSHGATEWAY_URL: {{ . | quote }}
{{- end }}
{{- with .Values.webhookDispatcher.allowedHosts }}
CHAT_WEBHOOK_ALLOWED_HOSTS: {{ . | quote }}
{{- end }}
CHAT_WEBHOOK_MAX_ENDPOINTS_PER_APPLICATION: {{ .Values.webhookDispatcher.maxEndpointsPerApplication | int64 | quote }}
CHAT_WEBHOOK_TIMEOUT_MS: {{ .Values.webhookDispatcher.timeoutMs | int64 | quote }}
CHAT_WEBHOOK_MAX_IN_FLIGHT: {{ .Values.webhookDispatcher.maxInFlight | int64 | quote }}
CHAT_WEBHOOK_DISABLE_AFTER_SECONDS: {{ .Values.webhookDispatcher.disableAfterSeconds | int64 | quote }}
{{- end }}

{{/* The four connection URLs as Secret stringData. The chart ships no credentials: the URLs that
carry them must be given, unless the URLs come from connections.existingSecret. */}}
{{- define "chat.connectionData" -}}
{{- $hint := "or set connections.existingSecret to a Secret with DATABASE_URL, REDIS_URL, AMQP_URL and ELASTICSEARCH_URL; to try the chart without any of these services, set embedded.enabled=true (one replica, data in the pod)" -}}
DATABASE_URL: {{ required (printf "connections.databaseUrl is required (e.g. mysql://chat:PASSWORD@mysql:3306/chat), %s" $hint) .Values.connections.databaseUrl | quote }}
REDIS_URL: {{ required (printf "connections.redisUrl is required (e.g. redis://redis:6379/0), %s" $hint) .Values.connections.redisUrl | quote }}
AMQP_URL: {{ required (printf "connections.amqpUrl is required (e.g. amqp://chat:PASSWORD@rabbitmq:5672/%%2f; RabbitMQ refuses its guest user from anywhere but its own host), %s" $hint) .Values.connections.amqpUrl | quote }}
ELASTICSEARCH_URL: {{ required (printf "connections.elasticsearchUrl is required (e.g. http://elasticsearch:9200), %s" $hint) .Values.connections.elasticsearchUrl | quote }}
{{- end }}

{{/* The egress rules of a component (context: root, the services it talks to, the DNS rule): DNS,
networkPolicy.egressTo of each of its services, and networkPolicy.egress. */}}
{{- define "chat.egressTo" -}}
- {{- toYaml .dns | nindent 2 }}
{{- range .services }}
{{- with index $.root.Values.networkPolicy.egressTo . }}
{{ toYaml . }}
{{- end }}
{{- end }}
{{- with .root.Values.networkPolicy.egress }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The worker components (component: values key), for templates that render them alike: the two
consumers and the webhook-dispatcher when enabled; none in embedded mode (the api process consumes
its own events and delivers the webhooks itself). */}}
{{- define "chat.workers" -}}
{{- if not .Values.embedded.enabled }}
ingest-worker: ingestWorker
indexer: indexer
{{- if .Values.webhookDispatcher.enabled }}
webhook-dispatcher: webhookDispatcher
{{- end }}
{{- end }}
{{- end }}

{{/* Probes of a long-running container on its health port (context: values, and the readiness
period and failure threshold): a startup probe (while it connects to its services) when
startupProbe.enabled, liveness on /livez, readiness on /readyz. */}}
{{- define "chat.probes" -}}
{{- with .values.startupProbe }}
{{- if .enabled }}
startupProbe:
  httpGet: {path: /livez, port: health}
  periodSeconds: {{ .periodSeconds }}
  failureThreshold: {{ .failureThreshold }}
{{- end }}
{{- end }}
livenessProbe:
  httpGet: {path: /livez, port: health}
  periodSeconds: 10
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /readyz, port: health}
  periodSeconds: {{ .readinessPeriodSeconds }}
  failureThreshold: {{ .readinessFailureThreshold }}
{{- end }}
