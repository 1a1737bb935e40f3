#!/usr/bin/env python3
"""Lints infra/template.yaml with cfn-lint, transforms the SAM template to
plain CloudFormation offline (aws-sam-translator), and deploys it into the
CloudFormation of a moto server; prints the stack outputs as JSON.

Usage: deploy_check.py MOTO_ENDPOINT [STACK_NAME [PARAMETER=VALUE ...]]
Used by crates/pacloud-aws/tests/infra.rs (which then drives the created
table, queue and bucket with pacloud's adapters, and runs fleet_check.py on
the fleet resources).

moto cannot build an AMI (its CloudFormation skips AWS::ImageBuilder::*), so
the stack is given two of moto's own AMIs as WorkerAmiX8664/WorkerAmiArm64:
the Image Builder resources are then conditioned out, as they are in a real
deployment that brings its own AMIs. EgressMode stays at its default (nat).
"""
import io
import ipaddress
import json
import os
import subprocess
import sys
import time
import zipfile

import boto3
from samtranslator.translator.transform import transform
from samtranslator.yaml_helper import yaml_parse

here = os.path.dirname(os.path.abspath(__file__))
template_path = os.path.join(here, "template.yaml")
endpoint = sys.argv[1]
stack = sys.argv[2] if len(sys.argv) > 2 else "pacloud"
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
creds = dict(region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing", endpoint_url=endpoint)

lint = subprocess.run([os.path.join(os.path.dirname(sys.executable), "cfn-lint"), template_path], capture_output=True, text=True)
if lint.returncode != 0:
    sys.exit(f"cfn-lint failed:\n{lint.stdout}{lint.stderr}")

# The function's code: a placeholder zip in a code bucket (moto does not run it).
s3 = boto3.client("s3", **creds)
s3.create_bucket(Bucket="pacloud-code")
buf = io.BytesIO()
with zipfile.ZipFile(buf, "w") as z:
    z.writestr("bootstrap", "#!/bin/sh\n")
s3.put_object(Bucket="pacloud-code", Key="lambda.zip", Body=buf.getvalue())

with open(template_path) as f:
    sam = yaml_parse(f.read())
for res in sam["Resources"].values():
    if res.get("Type") == "AWS::Serverless::Function":
        res["Properties"]["CodeUri"] = "s3://pacloud-code/lambda.zip"
        # moto runs a function's code in a container pulled from a registry (not
        # reachable here): a schedule rule or an SQS event source mapping aimed
        # at a function makes moto invoke the placeholder on events and answer
        # 500 to the sender. They are lint-only (docs/fleet.md); the queues, the
        # other rules and the function are created.
        events = res["Properties"].get("Events", {})
        for name in [n for n, e in events.items() if e.get("Type") in ("SQS", "Schedule")]:
            del events[name]
ec2 = boto3.client("ec2", **creds)
def moto_ami(arch):
    images = ec2.describe_images(Owners=["amazon"], Filters=[{"Name": "architecture", "Values": [arch]}])["Images"]
    if not images:
        sys.exit(f"moto offers no {arch} AMI")
    return sorted(i["ImageId"] for i in images)[0]
params = {"WorkerAmiX8664": moto_ami("x86_64"), "WorkerAmiArm64": moto_ami("arm64")}
for arg in sys.argv[3:]:
    key, sep, value = arg.partition("=")
    if not sep or key not in sam["Parameters"]:
        sys.exit(f"deploy_check: {arg!r} is not PARAMETER=VALUE for a template parameter")
    params[key] = value
cfn = transform(sam, params, None)


def expand_cidr(node, vpc_cidr):
    """moto's CloudFormation has no Fn::Cidr: compute it here (only for the
    VPC's own block, the one use in the template) before handing it over."""
    if isinstance(node, dict):
        if set(node) == {"Fn::Cidr"}:
            block, count, bits = node["Fn::Cidr"]
            if block not in ({"Fn::GetAtt": ["WorkerVpc", "CidrBlock"]}, {"Ref": "VpcCidr"}):
                sys.exit(f"deploy_check: cannot expand Fn::Cidr of {block}")
            net = ipaddress.ip_network(vpc_cidr)
            return [str(n) for n in list(net.subnets(new_prefix=net.max_prefixlen - int(bits)))[: int(count)]]
        return {k: expand_cidr(v, vpc_cidr) for k, v in node.items()}
    if isinstance(node, list):
        return [expand_cidr(v, vpc_cidr) for v in node]
    return node


vpc_cidr = params.get("VpcCidr", cfn["Parameters"]["VpcCidr"]["Default"])
cfn["Resources"] = expand_cidr(cfn["Resources"], vpc_cidr)

cf = boto3.client("cloudformation", **creds)
cf.create_stack(
    StackName=stack,
    TemplateBody=json.dumps(cfn),
    Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in params.items()],
    Capabilities=["CAPABILITY_IAM"],
)
deadline = time.time() + 60
while True:
    s = cf.describe_stacks(StackName=stack)["Stacks"][0]
    if s["StackStatus"].endswith("_COMPLETE") or s["StackStatus"].endswith("_FAILED") or time.time() > deadline:
        break
    time.sleep(0.5)
if s["StackStatus"] != "CREATE_COMPLETE":
    sys.exit(f"stack status {s['StackStatus']}: {s.get('StackStatusReason')}")
print(json.dumps({o["OutputKey"]: o["OutputValue"] for o in s.get("Outputs", [])}))
